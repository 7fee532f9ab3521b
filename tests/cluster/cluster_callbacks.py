"""Callbacks the cluster tests put into ``lora-lightning fit`` runs by ``class_path`` (this folder is on the
subprocess's PYTHONPATH). They simulate what a cluster does to a job and record what the test compares."""
from __future__ import annotations

import os
import signal

import lightning as L
import torch

from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator
from lora_lightning.allocation.importance import full_tensor
from lora_lightning.sharding import has_meta_tensors


class SignalAtStep(L.Callback):
    """Send ``signum`` to this process at the start of the batch that follows optimiser step ``step``.

    The start of a batch is a point where every callback has finished with the previous step, which is where the
    test wants the requeue checkpoint. ``SIGUSR1`` stands for Slurm's ``--signal=USR1@90``; ``SIGKILL`` for
    ``kill -9`` (an OOM kill, a node lost). Only on the first launch: a marker file stops it firing again.
    """

    def __init__(self, step: int, signum: str = "SIGUSR1", marker: str | None = None) -> None:
        self.step, self.signum, self.marker = step, signum, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or (self.marker and os.path.exists(self.marker)):
            return
        if self.marker:
            open(self.marker, "w").close()
        os.kill(os.getpid(), getattr(signal, self.signum))


class StopAtStep(L.Callback):
    """Stop the fit after optimiser step ``step`` (an interrupted run), only on the first launch: a marker file per
    rank (``marker`` formatted with ``rank``) stops it firing again, so the same command line resumes to the end."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        marker = self.marker.format(rank=trainer.global_rank)
        if trainer.global_step == self.step and not os.path.exists(marker):
            open(marker, "w").close()
            trainer.should_stop = True


class DumpState(L.Callback):
    """At the end of fit, write (per rank) the adapter weights, every callback's state and the rank layout, and
    whether the backbone was still empty (meta device, ``base_from_rank0``) when the fit was set up."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base_was_empty: bool | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.base_was_empty = has_meta_tensors(pl_module.backbone)

    def on_fit_end(self, trainer, pl_module) -> None:
        full = pl_module.state_dict()
        state = {
            "global_step": trainer.global_step,
            "adapter": {k: full_tensor(full[k].detach()).cpu().clone() for k in pl_module.adapter_state_keys()},
            "callbacks": {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks
                          if type(cb).__module__.startswith("lora_lightning") or isinstance(cb, HessianSensitivityEstimator)},
            "allocation": getattr(pl_module, "allocation", None),
            "base_was_empty": self.base_was_empty,
        }
        if hasattr(pl_module, "rank_units"):
            state["masks"] = {n: u.mask.detach().cpu().clone() for n, u in pl_module.rank_units().items()}
        torch.save(state, self.path.format(rank=trainer.global_rank))


class CountingEstimator(HessianSensitivityEstimator):
    """The Sensitivity-LoRA estimator, appending a line to ``record`` every time it calibrates."""

    def __init__(self, record: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.record = record

    def allocate(self, trainer, pl_module) -> None:
        with open(self.record, "a") as handle:
            handle.write(f"calibrated rank={trainer.global_rank}\n")
        super().allocate(trainer, pl_module)
