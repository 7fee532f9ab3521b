"""Scale one optimiser param group's learning rate for a single step, leaving the LR scheduler's value untouched.

Used by the hypernetwork warmup (:class:`~lora_lightning.callbacks.HypernetWarmup`) and AdaLoRA's Λ learning-rate
boost: both multiply the scheduled rate of a named group right before ``optimizer.step()`` and put the scheduled
rate back right after it, so the scheduler never sees the factor and the two compose.
"""
from __future__ import annotations

import torch

ScheduledLRs = list[tuple[dict, float]]


def scale_group_lr(optimizer: torch.optim.Optimizer, group_name: str, factor: float) -> ScheduledLRs:
    """Multiply the LR of every param group named ``group_name`` by ``factor``; returns what
    :func:`restore_group_lrs` needs to put the scheduled rates back."""
    scheduled = [(group, group["lr"]) for group in optimizer.param_groups if group.get("name") == group_name]
    for group, lr in scheduled:
        group["lr"] = lr * factor
    return scheduled


def restore_group_lrs(scheduled: ScheduledLRs) -> None:
    for group, lr in scheduled:
        group["lr"] = lr
