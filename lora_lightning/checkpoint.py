"""Reading checkpoints safely: weights-only unpickling, and clear errors instead of raw tracebacks."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

# What torch.load raises for a truncated, overwritten or non-checkpoint file.
UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError)


class CheckpointReadError(ValueError):
    """A checkpoint file that is missing, truncated, corrupted or not ours."""


def unreadable(path: str, error: BaseException) -> CheckpointReadError:
    return CheckpointReadError(
        f"Checkpoint '{path}' cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        f"it is truncated or corrupted. Use an earlier checkpoint (e.g. the previous 'last.ckpt')."
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with a :class:`CheckpointReadError` for a damaged file instead of torch's traceback.

    A Trainer plugin: the ``lora-lightning`` CLI passes it by default; from Python, pass it yourself,
    ``L.Trainer(plugins=[SafeCheckpointIO()])``, so that ``fit/validate(ckpt_path=...)`` report a damaged file as
    clearly as the CLI does.
    """

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except UNREADABLE as error:
            raise unreadable(os.fspath(path), error) from error


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs) and check it was written by lora-lightning."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointReadError(f"Checkpoint '{path}' does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:
        raise unreadable(path, error) from error
    if not isinstance(checkpoint, dict) or "lora_lightning" not in checkpoint:
        raise CheckpointReadError(f"'{path}' is not a lora-lightning checkpoint (no 'lora_lightning' section).")
    return checkpoint
