"""FinalCheckpoint: what a fit leaves behind matches the step it ended at.

Lightning validates every ``val_check_interval`` batches and a ``ModelCheckpoint(save_last=True)`` rewrites
``last.ckpt`` only when it saves a monitored checkpoint, so a run of 20 steps validating every 8 ends with metrics,
``best`` and ``last`` of step 16 (or, when the metric did not improve, an even older ``last``). This callback, which
every lora-lightning module installs through ``configure_callbacks``:

* checks in ``setup``, before any work, that every monitored name is a metric the module logs
  (:func:`~lora_lightning.callbacks.task_checkpoint.check_monitors`);
* asks Lightning to stop at the final optimiser step, which makes it validate after that batch (as it does for
  ``EarlyStopping``), so the metrics and the monitored checkpoints see the final state;
* at the end of training rewrites each ``save_last`` checkpoint that does not hold the final step.
"""
from __future__ import annotations

import math
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lora_lightning.callbacks.task_checkpoint import check_monitors


def saved_step(path: str | os.PathLike | None) -> int | None:
    """The optimiser step (``global_step``) a checkpoint file holds; ``None`` when there is no such local file."""
    if not path or not os.path.isfile(path):
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor is read
    return int(checkpoint["global_step"])


class FinalCheckpoint(Callback):
    """Validate at the final optimiser step and leave every ``save_last`` checkpoint at that step (module docstring)."""

    def __init__(self) -> None:
        self.final_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(pl_module, "monitorable_metrics"):
            check_monitors(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self.final_step = int(total) if math.isfinite(total) else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.final_step is not None and trainer.global_step >= self.final_step:
            trainer.should_stop = True  # Lightning then validates after this batch, whatever val_check_interval says

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                self._refresh_last(trainer, callback)

    @staticmethod
    def _refresh_last(trainer: L.Trainer, callback: ModelCheckpoint) -> None:
        path = callback.last_model_path or callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
        stale = saved_step(path) != trainer.global_step if trainer.is_global_zero else None
        if not trainer.strategy.broadcast(stale, src=0):
            return
        if trainer.is_global_zero and os.path.islink(path):  # save_last="link": replace the link, not its target
            os.remove(path)
        callback.last_model_path = path  # before saving: the callback's state is part of the file
        trainer.save_checkpoint(path)
