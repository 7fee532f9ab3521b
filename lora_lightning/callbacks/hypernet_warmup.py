"""HypernetWarmup: ramp the hypernetwork's learning rate over the first optimiser steps (METHODS.md §4).

The ramp acts on the optimiser param group named ``group_name`` ("hypernet", as the HyperAdaLoRA/HyperLoRA modules
name it), never on ``requires_grad``: toggling trainability after DDP has wrapped the model silently desynchronises
ranks. Right before each optimiser step the group's learning rate (whatever the LR scheduler set) is multiplied by
``min(1, (t + 1) / warmup_steps)``; right after the step (an optimiser step post-hook, which runs before Lightning
steps the LR scheduler) the scheduled value is put back, so the LR scheduler never sees the ramp and the two compose (the scheduler's own warmup applies on top). The ramp depends only on the
optimiser step, which Lightning restores on resume; the callback's ``state_dict`` carries its settings and the
step it reached, so a resumed run ramps exactly as an uninterrupted one.

A front-loaded generator (the module's ``hypernet_settings.fold_at``) also decays: the factor is further multiplied
by ``max(0, 1 - t / fold_steps)``, 0 from the step at which the module folds the generators into the base factors.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lora_lightning.allocation.budget import resolve_steps
from lora_lightning.group_lr import restore_group_lrs, scale_group_lr


class HypernetWarmup(Callback):
    """Linear warmup of one param group's learning rate.

    Args:
        warmup_steps (int | float | None): optimiser steps of the ramp; an int counts steps, a float is a fraction
            of the run; ``None``: the module's ``hypernet_settings.warmup`` (its ``hypernet_warmup`` argument).
        group_name (str): the ``name`` of the optimiser param group to ramp.
    """

    def __init__(self, warmup_steps: int | float | None = None, group_name: str = "hypernet") -> None:
        super().__init__()
        if warmup_steps is not None:
            resolve_steps(warmup_steps, 1, "warmup_steps")  # type and range check now
        self.warmup_steps, self.group_name = warmup_steps, group_name
        self.resolved_steps: int | None = None
        self.decay_steps: int | None = None  # the module's fold step, if any
        self.step = 0
        self._scheduled: list[tuple[dict, float]] = []
        self._hooks: list = []

    def factor(self, step: int) -> float:
        total = self.resolved_steps or 0
        ramp = 1.0 if total <= 0 else min(1.0, (step + 1) / total)
        return ramp if self.decay_steps is None else ramp * max(0.0, 1.0 - step / max(self.decay_steps, 1))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup_steps is None:
            settings = getattr(pl_module, "hypernet_settings", None)
            if settings is None:
                raise ValueError(f"HypernetWarmup needs warmup_steps: {type(pl_module).__name__} has no hypernet "
                                 "settings to take it from.")
            self.warmup_steps = settings.warmup
        if self.resolved_steps is None:
            total = trainer.estimated_stepping_batches
            if isinstance(self.warmup_steps, float) and total == float("inf"):
                raise ValueError("HypernetWarmup with a fractional warmup_steps needs a run with a step limit.")
            self.resolved_steps = resolve_steps(self.warmup_steps, int(total) if total != float("inf") else 1, "warmup_steps")
        settings = getattr(pl_module, "hypernet_settings", None)
        if self.decay_steps is None and settings is not None and settings.fold_at is not None:
            self.decay_steps = pl_module.fold_step
        groups = [g for opt in trainer.optimizers for g in opt.param_groups if g.get("name") == self.group_name]
        if not groups:
            names = [g.get("name") for opt in trainer.optimizers for g in opt.param_groups]
            raise ValueError(f"HypernetWarmup found no optimiser param group named '{self.group_name}' (groups: {names}).")
        self._remove_hooks()
        self._hooks = [opt.register_step_post_hook(lambda *_: self._restore()) for opt in trainer.optimizers]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._restore()
        factor = self.factor(trainer.global_step)
        self._scheduled = scale_group_lr(optimizer, self.group_name, factor)
        self.step = trainer.global_step + 1
        pl_module.log("train/hypernet_lr_factor", factor, on_step=True, on_epoch=False, batch_size=1)

    def _restore(self) -> None:
        restore_group_lrs(self._scheduled)
        self._scheduled = []

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self._remove_hooks()

    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn
        return {**self.__dict__, "_scheduled": [], "_hooks": []}

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "resolved_steps": self.resolved_steps, "step": self.step,
                "decay_steps": self.decay_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warmup_steps = state_dict["warmup_steps"]
        self.resolved_steps = state_dict["resolved_steps"]
        self.step = int(state_dict["step"])
        self.decay_steps = state_dict.get("decay_steps")  # absent from checkpoints written before it existed
