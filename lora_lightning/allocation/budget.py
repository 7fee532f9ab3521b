"""AdaLoRA's budget: the cubic schedule of how many triplets stay, and global top-b masking (METHODS.md §2).

Steps ``t`` are optimiser steps counted from 1 (``t`` = steps taken so far). With ``T`` total steps:

* ``t <= tinit``: warm-up, every triplet kept (``b0 = r_init · n``), no masking;
* ``tinit < t < T - tfinal``: ``b(t) = b_T + (b0 - b_T) · (1 - (t - tinit) / (T - tinit - tfinal))³`` (integer part),
  masking every ``delta_t`` steps;
* ``t >= T - tfinal``: the target ``b_T = r_target · n``; the pattern is fixed once, at the first such step, and kept.
  (``>=``: a counter that skips the exact step still finalises.)

This is PEFT's ``RankAllocator`` schedule as driven by ``AdaLoraModel.update_and_allocate``. What masking does to Λ
differs from PEFT (see :func:`truncate`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_lightning.allocation.flat import flatten, unflatten
from lora_lightning.allocation.importance import RankUnit


def resolve_steps(value: int | float, total_step: int, name: str) -> int:
    """A phase length given as steps (int) or as a fraction of the run (float in [0, 1))."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int number of steps or a float fraction, got {value!r}.")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} as a fraction of the run must be in [0, 1), got {value}.")
        return int(value * total_step)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 steps, got {value}.")
    return int(value)


def check_phases(tinit: int, tfinal: int, total_step: int | None, delta_t: int) -> None:
    """The schedule's checks, in steps (``total_step`` ``None``: the run length is not known yet)."""
    if delta_t < 1:
        raise ValueError(f"delta_t must be >= 1 optimiser step, got {delta_t}.")
    if total_step is None:
        return
    if total_step < 1:
        raise ValueError(f"total_step must be >= 1, got {total_step}.")
    if tinit + tfinal >= total_step:
        raise ValueError(
            f"The rank schedule does not fit the run: tinit ({tinit}) + tfinal ({tfinal}) must be less than "
            f"total_step ({total_step}) so that there are steps left to prune in; lower tinit/tfinal or train for "
            f"longer."
        )


@dataclass(frozen=True)
class BudgetSchedule:
    init_budget: int
    target_budget: int
    tinit: int
    tfinal: int
    total_step: int
    delta_t: int = 1

    def __post_init__(self) -> None:
        if self.target_budget > self.init_budget:
            raise ValueError(f"The target budget ({self.target_budget}) exceeds the initial one ({self.init_budget}).")
        if self.target_budget < 0:
            raise ValueError(f"The target budget must be >= 0, got {self.target_budget}.")
        check_phases(self.tinit, self.tfinal, self.total_step, self.delta_t)

    @property
    def final_step(self) -> int:
        """The first step of the final phase (the pattern is fixed here)."""
        return self.total_step - self.tfinal

    def budget(self, step: int) -> int:
        if step <= self.tinit:
            return self.init_budget
        if step >= self.final_step:
            return self.target_budget
        progress = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)

    def updates_importance(self, step: int) -> bool:
        return step < self.final_step

    def masks_at(self, step: int) -> bool:
        """Whether a masking event falls on ``step`` in the budget phase (the final one is handled apart)."""
        return self.tinit < step < self.final_step and step % self.delta_t == 0


def top_b_masks(scores: dict[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Keep exactly ``budget`` triplets over all units: the highest scores, ties going to the earlier unit (in the
    dict's order) and then the lower index. ``budget`` at or above the total keeps everything; 0 keeps nothing."""
    flat = flatten(s.detach().float().cpu() for s in scores.values())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    budget = max(0, min(int(budget), flat.numel()))
    if budget:
        # NaN would sort first; treat it as the least important.
        flat = torch.nan_to_num(flat, nan=float("-inf"))
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:budget]] = True
    return dict(zip(scores, unflatten(keep.float(), list(scores.values()))))


def placed_like(mask: Tensor, tensor: Tensor) -> Tensor:
    """``mask`` (the same on every process) laid out as ``tensor``: this process's part where ``tensor`` is sharded
    (an FSDP2 DTensor, no communication), else ``mask`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(tensor, DTensor):
        return mask
    return distribute_tensor(mask, tensor.device_mesh, tensor.placements, src_data_rank=None)


@torch.no_grad()
def truncate(units: Mapping[str, RankUnit], keep: Mapping[str, Tensor],
             optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """The paper's truncation of pruned triplets: wherever ``keep[name]`` is 0, set the entry of the unit's
    ``stored_lam`` to 0 and the same entry of every state tensor of its shape that an optimiser holds for it
    (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's momentum buffer, ...). A masked Λ entry then gets no gradient and no
    momentum, so it stays exactly 0 until an event keeps it again, and it restarts from 0. (PEFT instead writes 0
    into Λ at each event and lets the pruned entries regrow, with their old moments, until the next one.)
    Units without ``stored_lam`` are left alone."""
    states = [optimizer.state for optimizer in optimizers]
    for name, unit in units.items():
        stored = unit.stored_lam
        if stored is None:
            continue
        pruned = placed_like(keep[name].reshape(stored.shape).to(stored.device) == 0, stored)
        stored.masked_fill_(pruned, 0.0)
        for state in states:
            for value in state.get(stored, {}).values():
                if torch.is_tensor(value) and value.shape == stored.shape:
                    value.masked_fill_(pruned.to(value.device), 0.0)
