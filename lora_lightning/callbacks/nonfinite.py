"""NonFiniteGuard: a fit stops at the first non-finite training loss or trained weight, before it is checkpointed.

A NaN or infinite loss (typically a learning rate far too large, or fp16 overflow) poisons the weights at the next
optimiser step, after which every metric and checkpoint is garbage; Lightning would train on and exit 0. The guard
runs after each training batch, before the ``ModelCheckpoint`` callbacks (Lightning orders them last) and before any
validation of that step, so a non-finite state never becomes ``best`` or ``last``.

fp16 loss scaling stays allowed: a step whose gradients overflow is skipped by the ``GradScaler`` with a finite loss
and unchanged weights, so it passes both checks.
"""
from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lora_lightning.sharding import local_shard


class NonFiniteTrainingError(RuntimeError):
    """The training loss or a trained weight became NaN or infinite."""


def any_nonfinite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d float tensor on ``device``: 1 when any of ``tensors`` holds a NaN or infinity, else 0 (no host sync)."""
    if not tensors:
        return torch.zeros((), device=device)
    local = [t for t in (local_shard(t.detach()) for t in tensors) if t.numel()]  # FSDP2: this process's shard
    if not local:
        return torch.zeros((), device=device)
    # one grouped kernel for all tensors: the max-abs norm is NaN/inf exactly when the tensor holds a NaN/inf
    peaks = torch.stack([peak.float().to(device) for peak in torch._foreach_norm(local, float("inf"))])
    return (~torch.isfinite(peaks)).any().float()


class NonFiniteGuard(Callback):
    """Raise :class:`NonFiniteTrainingError` at the first non-finite training loss (checked on every batch) or
    non-finite trainable parameter (checked after every optimiser step); processes agree through one reduction."""

    def __init__(self) -> None:
        self.checked_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        stepped = trainer.global_step != self.checked_step  # False on a gradient-accumulation micro-batch
        self.checked_step = trainer.global_step
        trained = [p for p in pl_module.parameters() if p.requires_grad] if stepped else []
        losses = [loss] if isinstance(loss, torch.Tensor) else []
        flags = torch.stack([any_nonfinite(losses, pl_module.device), any_nonfinite(trained, pl_module.device)])
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        bad_loss, bad_weights = (flag > 0 for flag in flags.tolist())  # the only host sync of the check
        if bad_loss:
            value = loss.item() if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all() else "non-finite"
            raise NonFiniteTrainingError(
                f"The training loss is {value} at optimiser step {trainer.global_step} (epoch {trainer.current_epoch}, "
                f"batch {batch_idx}); training stopped before this state was validated or checkpointed. "
                + self._advice(trainer, pl_module)
            )
        if bad_weights:
            names = [n for n, p in pl_module.named_parameters()
                     if p.requires_grad and not torch.isfinite(local_shard(p.detach())).all()]
            first = f" (first: {names[0]})" if names else " (on another process)"
            raise NonFiniteTrainingError(
                f"{len(names) or 'Some'} trained tensors became NaN or infinite at optimiser step "
                f"{trainer.global_step}{first}; training stopped before this state was validated or checkpointed. "
                + self._advice(trainer, pl_module)
            )

    @staticmethod
    def _advice(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        lr = pl_module.hparams.get("learning_rate")
        lr = f" (this run: {lr:g})" if isinstance(lr, (int, float)) else ""
        precision = str(trainer.precision)
        if precision.startswith("16"):
            precision = f", or precision bf16-mixed or 32-true instead of {precision} (fp16 overflows)"
        else:
            precision = f"; precision {precision} rules out an fp16 overflow"
        return f"Try a lower learning_rate{lr}{precision}; a longer warmup_ratio or trainer.gradient_clip_val also help."
