"""Helpers shared by test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning.pytorch.callbacks import Callback

from lora_lightning.allocation.importance import ImportanceTracker


def random_batch(vocab_size: int = 30522, batch_size: int = 4, seq_len: int = 12, num_labels: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_loader(n: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """``n`` ready-made random batches (see :func:`random_batch`), one per step."""
    return torch.utils.data.DataLoader([random_batch(seed=seed + i) for i in range(n)], batch_size=None)


@contextmanager
def one_process_group() -> Iterator[None]:
    """Around an in-process distributed run (a 1-process ModelParallelStrategy): destroy its process group and restore
    ``os.environ`` afterwards, so a later ``ddp_spawn`` test neither reuses its MASTER_ADDR/PORT nor its group."""
    environment = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def quiet_trainer(**kwargs):
    """A CPU Trainer without logger, checkpoints, progress bar or summary, unless ``kwargs`` says otherwise."""
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_model_summary=False,
                    enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


class UnitsModule:
    """Only the rank-unit interface (no AdaLoRA settings: the scheduler takes target_r from its own arguments)."""

    def __init__(self, units) -> None:
        self.units = units

    def rank_units(self):
        return self.units


def scheduler_on_units(scheduler, units, total_step: int) -> UnitsModule:
    """Set ``scheduler`` up for a ``total_step`` run over ``units`` without a Trainer; returns the module stub to pass
    to ``scheduler.allocate``."""
    from types import SimpleNamespace

    module = UnitsModule(units)
    scheduler.setup(SimpleNamespace(estimated_stepping_batches=total_step), module, "fit")
    return module


class FlipFirstTriplet(ImportanceTracker):
    """AdaLoRA's importance, except for the first unit's triplet 0: last at odd masking events, first at even ones,
    so that it is pruned and kept again in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.events = 0

    def triplet_scores(self, units):
        self.events += 1
        scores = super().triplet_scores(units)
        first = next(iter(scores))
        scores[first] = scores[first].clone()
        scores[first][0] = float("inf") if self.events % 2 == 0 else float("-inf")
        return scores


class TruncationProbe(Callback):
    """Listed after the RankPruningScheduler, records after every optimiser step: whether it was a masking event, the
    largest |value| left at pruned triplets in any unit's ``stored_lam`` and in its optimiser state of that shape,
    how many such state tensors were seen, and the first unit's triplet 0 (kept?, stored Λ, moments)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lora_lightning.callbacks import RankPruningScheduler

        schedule = next(cb for cb in trainer.callbacks if isinstance(cb, RankPruningScheduler)).schedule
        state, step = trainer.optimizers[0].state, trainer.global_step
        units = pl_module.rank_units()
        residue, moments = 0.0, 0
        for unit in units.values():
            pruned = unit.mask == 0
            per_entry = [t for t in state.get(unit.stored_lam, {}).values()
                         if torch.is_tensor(t) and t.shape == unit.stored_lam.shape]
            moments += len(per_entry)
            for t in [unit.stored_lam.detach(), *per_entry]:
                if pruned.any():
                    residue = max(residue, t[pruned].abs().max().item())
        first = next(iter(units.values()))
        self.steps[step] = {
            "event": schedule.masks_at(step) or step == schedule.final_step,
            "residue": residue, "moments": moments, "pruned": sum(int((u.mask == 0).sum()) for u in units.values()),
            "first_kept": bool(first.mask[0]), "first_lam": first.stored_lam[0].item(),
            "first_state": [t[0].item() for t in state.get(first.stored_lam, {}).values()
                            if torch.is_tensor(t) and t.shape == first.stored_lam.shape],
        }

    def rekept_steps(self) -> list[int]:
        """Steps at which the first unit's triplet 0 came back after being pruned."""
        steps = sorted(self.steps)
        return [s for prev, s in zip(steps, steps[1:])
                if self.steps[s]["first_kept"] and not self.steps[prev]["first_kept"]]
