"""Exports: a PEFT-format adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and a merged
full model through ``save_pretrained``, each with the backbone's tokenizer and the label names, so the folder
alone (plus, for PEFT, the base model it names) is enough to run the model. Every export is written atomically
(:func:`lora_lightning.atomic.atomic_folder`) after its output folder was checked."""
from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning.adapters.base import adapter_layers, unload_adapters
from lora_lightning.adapters.quant import check_mergeable
from lora_lightning.atomic import atomic_folder, check_output_folder
from lora_lightning.backbone import load_tokenizer, locate_backbone
from lora_lightning.checkpoint import read_checkpoint
from lora_lightning.modules.base import CHECKPOINT_KEY, AdapterModule

PEFT_PREFIX = "base_model.model."
LABEL_NAMES_FILE = "label_names.json"


def base_model_reference(module: AdapterModule) -> str:
    """The backbone as ``from_pretrained`` accepts it anywhere: a packaged alias becomes its folder, a local path an
    absolute path, a hub id stays as it is."""
    source, _ = locate_backbone(module.hparams.backbone)
    return os.path.abspath(source) if os.path.exists(source) else source


def _task_type(module: AdapterModule) -> str:
    return "CAUSAL_LM" if module.hparams.task == "causal-lm" else "SEQ_CLS"


def _saved_module_tensors(module: AdapterModule) -> dict[str, torch.Tensor]:
    """Full weights of ``modules_to_save`` under PEFT's key names."""
    tensors = {}
    for name in module.modules_to_save:
        for key, value in module.backbone.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value
    return tensors


def peft_lora_state(module: AdapterModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` in PEFT's LoRA format with per-module ranks.

    Every adapter reports its update as LoRA factors (``AdapterLayer.lora_factors``); an SVD adapter gives
    only its kept triplets, so a module pruned to rank 0 is left out. The per-module ``lora_alpha`` is chosen so
    that PEFT's ``lora_alpha / r`` equals our scaling.
    """
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for name, layer in adapter_layers(module.backbone).items():
        lora_a, lora_b, scaling = layer.lora_factors()
        rank = lora_a.shape[0]
        if rank == 0:
            continue
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b
        rank_pattern[name] = rank
        alpha_pattern[name] = scaling * rank
    if not rank_pattern:
        raise ValueError("Every adapter has rank 0 after pruning: there is nothing to export.")
    tensors.update(_saved_module_tensors(module))
    first = next(iter(rank_pattern))
    config = {
        "peft_type": "LORA",
        "task_type": _task_type(module),
        "base_model_name_or_path": base_model_reference(module),
        "target_modules": sorted(rank_pattern),
        "r": rank_pattern[first],
        "lora_alpha": alpha_pattern[first],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        # transformers' Conv1D (GPT-2) stores W transposed; PEFT must know to read lora_B·lora_A that way.
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in adapter_layers(module.backbone).values()),
        "modules_to_save": module.modules_to_save or None,
        "inference_mode": True,
    }
    return config, tensors


def peft_adalora_state(module: AdapterModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` in PEFT's AdaLoRA format: kept triplets only (``lora_A`` = Q, ``lora_B`` = P,
    ``lora_E`` = Λ as ``(k, 1)``) and a boolean ``rank_pattern`` that PEFT uses to resize its modules on load.

    PEFT scales by ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``; ``lora_alpha`` is written so that this
    equals our ``alpha / init_r`` exactly. ``target_r``, the schedule (``tinit``, ``tfinal``, ``deltaT``, ``beta1``,
    ``beta2``, ``total_step``, as resolved steps) and ``orth_reg_weight`` are the module's settings
    (:meth:`~lora_lightning.settings.AdaLoRASettings.peft_schedule`).
    """
    from lora_lightning.adapters.svd import SVDLinear

    layers = {name: layer for name, layer in adapter_layers(module.backbone).items()}
    if not layers or not all(isinstance(layer, SVDLinear) for layer in layers.values()):
        raise ValueError("The AdaLoRA export needs SVD adapters (AdaLoRAModule); use format='lora' for this module.")
    init_ranks = {layer.max_rank for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    if len(init_ranks) != 1 or len(alphas) != 1:
        raise ValueError("PEFT's AdaLoRA format needs one init_r and one alpha for every module; use format='lora'.")
    init_r, alpha = init_ranks.pop(), alphas.pop()
    tensors, rank_pattern = {}, {}
    for name, layer in layers.items():
        p, singular_values, q = layer.factors()
        kept = layer.rank_mask.nonzero().squeeze(1)
        tensors[f"{PEFT_PREFIX}{name}.lora_A"] = q[kept]
        tensors[f"{PEFT_PREFIX}{name}.lora_B"] = p[:, kept]
        tensors[f"{PEFT_PREFIX}{name}.lora_E"] = singular_values[kept].unsqueeze(1)
        rank_pattern[f"{name}.lora_E"] = [bool(v) for v in layer.rank_mask.tolist()]
    tensors.update(_saved_module_tensors(module))
    settings = module.run_settings or module.settings  # the last fit's resolved steps, else as configured
    config = {
        "peft_type": "ADALORA",
        "task_type": _task_type(module),
        "base_model_name_or_path": base_model_reference(module),
        "target_modules": sorted(layers),
        **settings.peft_schedule(),
        "init_r": init_r,
        "lora_alpha": alpha * (init_r + 1e-5) / init_r,
        "lora_dropout": 0.0,
        "rank_pattern": rank_pattern,
        "bias": "none",
        # transformers' Conv1D (GPT-2) stores W transposed; PEFT must know to read lora_B·lora_A that way.
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in adapter_layers(module.backbone).values()),
        "modules_to_save": module.modules_to_save or None,
        "inference_mode": True,
    }
    return config, tensors


# format name -> function returning (adapter_config, tensors); methods register their own formats.
PEFT_FORMATS: dict[str, Callable[[AdapterModule], tuple[dict, dict[str, torch.Tensor]]]] = {
    "lora": peft_lora_state,
    "adalora": peft_adalora_state,
}


def _write_inference_files(module: AdapterModule, folder: Path) -> None:
    """The backbone's tokenizer and, when the module has them, its label names (``label_names.json``)."""
    load_tokenizer(module.hparams.backbone, module.hparams.trust_remote_code).save_pretrained(folder)
    if module.label_names:
        (folder / LABEL_NAMES_FILE).write_text(json.dumps(module.label_names))


def export_peft(module: AdapterModule, folder: str | os.PathLike, format: str = "lora", overwrite: bool = False) -> Path:
    """Write the adapter as a folder that ``peft.AutoPeftModelFor….from_pretrained(folder)`` loads (its
    ``base_model_name_or_path`` is the resolved backbone), with the tokenizer and label names beside it."""
    if format not in PEFT_FORMATS:
        raise ValueError(f"Unknown export format '{format}'; choose one of {sorted(PEFT_FORMATS)}.")
    check_output_folder(folder, overwrite)
    config, tensors = PEFT_FORMATS[format](module)
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}
    load_kwargs = locate_backbone(module.hparams.backbone)[1]
    if load_kwargs:
        warnings.warn(
            f"The base model '{module.hparams.backbone}' loads with {load_kwargs}: pass the same arguments to "
            f"AutoPeftModel….from_pretrained({os.fspath(folder)!r}, ...).", stacklevel=2,
        )
    with atomic_folder(folder, overwrite) as staging:
        save_file(tensors, staging / "adapter_model.safetensors", metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        _write_inference_files(module, staging)
    return Path(folder)


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Make a backbone loaded from a GGUF file saveable: ``transformers`` dequantises GGUF weights on load, yet keeps
    the GGUF quantizer (which refuses ``save_pretrained``) and the ``gguf_file`` reference in the config."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer.quantization_config, "quant_method", None) != "gguf":
        return
    packed = [name for name, parameter in model.named_parameters() if not parameter.is_floating_point()]
    if packed:
        raise ValueError(
            f"The backbone keeps GGUF-packed weights ({packed[0]}, ...), which cannot be merged and saved; "
            f"export format 'lora' instead, or load the backbone dequantised."
        )
    quantizer.remove_quantization_config(model)


def export_merged(module: AdapterModule, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Merge every adapter into its base weight and save the plain ``transformers`` model (safetensors) with the
    tokenizer and label names (``config.id2label``): ``transformers.pipeline(task, model=folder)`` runs it."""
    check_output_folder(folder, overwrite)
    for name, layer in adapter_layers(module.backbone).items():  # before copying the whole backbone
        check_mergeable(layer.base_layer, name)
    merged = unload_adapters(copy.deepcopy(module.backbone).cpu(), merge=True)
    _drop_gguf_quantizer(merged)
    if module.hparams.task == "sequence-classification" and module.label_names:
        merged.config.id2label = dict(enumerate(module.label_names))
        merged.config.label2id = {name: i for i, name in enumerate(module.label_names)}
    with atomic_folder(folder, overwrite) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        _write_inference_files(module, staging)
    return Path(folder)


def export_formats() -> list[str]:
    """Every ``format`` :func:`export_checkpoint` accepts: the registered PEFT formats and ``merged``."""
    return [*sorted(PEFT_FORMATS), "merged"]


def unfinished_rank_pattern(checkpoint: dict) -> str | None:
    """Why the checkpoint's adaptive rank pattern is not the run's final one, or ``None`` (final, or no pruning).

    Reads the state that Lightning saves in the checkpoint's ``callbacks`` section for a
    :class:`~lora_lightning.callbacks.RankPruningScheduler` (or a subclass: any state with a ``finalised`` flag): it
    is unfinished when the final budget was not applied yet (``finalised`` false) although pruning was scheduled
    (``budget`` > 0; a scheduler with nothing to prune, ``init_r == target_r``, keeps budget 0).
    """
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("finalised") is False and state.get("budget", 0) > 0:
            return (
                f"its rank pattern is not final: the checkpoint was saved at step {state.get('step')}, before the "
                f"rank pruner applied the final budget (budget then: {state.get('budget')} triplets)"
            )
    return None


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output: str | os.PathLike,
    format: str = "lora",
    overwrite: bool = False,
    allow_unfinished_ranks: bool = False,
) -> Path:
    """Export a ``.ckpt`` written by ``lora-lightning fit``. Everything that can fail cheaply is checked before the
    backbone is loaded: the output folder, the format, the checkpoint file, and (AdaLoRA/HyperAdaLoRA) that its rank
    pattern is final: an unfinished one is an error unless ``allow_unfinished_ranks`` (then a warning)."""
    from lora_lightning import modules

    if format not in export_formats():
        raise ValueError(f"Unknown export format '{format}'; choose one of {export_formats()}.")
    check_output_folder(output, overwrite)
    checkpoint = read_checkpoint(checkpoint_path)
    method = checkpoint[CHECKPOINT_KEY]["method"]
    module_class = getattr(modules, method, None)
    if module_class is None:
        raise ValueError(f"The checkpoint was written by '{method}', which this version of lora-lightning lacks.")
    problem = unfinished_rank_pattern(checkpoint)
    if problem is not None:
        if not allow_unfinished_ranks:
            raise ValueError(
                f"Not exporting '{checkpoint_path}': {problem}. Export the checkpoint of the end of training "
                f"(last.ckpt), or pass --allow-unfinished-ranks (allow_unfinished_ranks=True) to export it anyway."
            )
        warnings.warn(f"Exporting '{checkpoint_path}' although {problem}.", stacklevel=2)
    module = module_class.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True)
    if format == "merged":
        return export_merged(module, output, overwrite=overwrite)
    return export_peft(module, output, format=format, overwrite=overwrite)


class ExportReadError(ValueError):
    """A PEFT export folder that is missing, incomplete or corrupted."""


PEFT_EXPORT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_peft_export(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of a folder written by :func:`export_peft`, checked: both files present, the
    config valid JSON with a ``peft_type``, the tensors a readable safetensors file (no pickle, no code runs) that
    holds a ``lora_A`` for every target module. Anything else is an :class:`ExportReadError` naming the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportReadError(f"Export folder '{folder}' does not exist.")
    missing = [name for name in PEFT_EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportReadError(
            f"Export folder '{folder}' is incomplete: {', '.join(missing)} missing. Export again "
            f"(lora-lightning export --checkpoint ... --output {folder} --overwrite)."
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportReadError(f"'{folder / 'adapter_config.json'}' is not valid JSON ({error}); export again.") from error
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ExportReadError(f"'{folder / 'adapter_config.json'}' is not a PEFT adapter config (no 'peft_type').")
    try:
        tensors = load_file(folder / "adapter_model.safetensors")
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportReadError(
            f"'{folder / 'adapter_model.safetensors'}' cannot be read ({error}); it is truncated or corrupted. "
            f"Export again."
        ) from error
    absent = [name for name in config.get("target_modules") or []
              if not any(key.endswith(f"{name}.lora_A.weight") or key.endswith(f"{name}.lora_A") for key in tensors)]
    if absent:
        raise ExportReadError(
            f"'{folder / 'adapter_model.safetensors'}' lacks the weights of {len(absent)} target modules "
            f"(first: {absent[0]}); the files do not belong together. Export again."
        )
    return config, tensors
