"""Reading checkpoints safely: weights-only unpickling, and clear errors instead of raw tracebacks."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch


class CheckpointReadError(ValueError):
    """A checkpoint file that is missing, truncated, corrupted or not ours."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs) and check it was written by lora-lightning."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"Checkpoint '{path}' does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as error:
        raise CheckpointReadError(
            f"Checkpoint '{path}' cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            f"it is truncated or corrupted. Use an earlier checkpoint (e.g. the previous 'last.ckpt')."
        ) from error
    if not isinstance(checkpoint, dict) or "lora_lightning" not in checkpoint:
        raise CheckpointReadError(f"'{path}' is not a lora-lightning checkpoint (no 'lora_lightning' section).")
    return checkpoint
