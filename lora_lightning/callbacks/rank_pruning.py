"""RankPruningScheduler: AdaLoRA's importance-driven rank pruning, run by Lightning once per optimiser step.

What the LightningModule must provide (the whole interface; nothing else of the module is touched):

* ``rank_units() -> dict[str, RankUnit]`` (:class:`lora_lightning.allocation.importance.RankUnit`): one entry per
  adapted matrix, in a fixed order, same names and shapes on every call and every rank. Each unit gives
  ``P (d_out × r)``, ``lam (r,)``, ``Q (r × d_in)`` whose values and ``.grad`` are those of the optimiser step just
  taken when ``on_train_batch_end`` runs, and ``mask``, an ``(r,)`` float buffer the scheduler overwrites in place
  with 0/1 (the module must apply it multiplicatively, e.g. ``Λ ⊙ m``). Leaf parameters satisfy this as they are
  (AdaLoRA); generated tensors must ``retain_grad()`` in the forward and be cached until then (HyperAdaLoRA).
  ``stored_lam``: the parameter or buffer the truncation zeroes (AdaLoRA's Λ; HyperAdaLoRA's base Λ̄), or ``None``.
* ``settings`` (:class:`~lora_lightning.settings.AdaLoRASettings`): ``target_r`` and the schedule. An option given
  to the scheduler itself (not ``None``) overrides the module's for this callback; a module without ``settings``
  needs ``target_r`` given here.

Per optimiser step ``t`` (``trainer.global_step``; accumulation micro-batches are not steps):

    update importance EMAs (t < T - tfinal, finite grads only) ─► every delta_t: top-b(t) masks ─► broadcast from
    rank 0 ─► write masks, truncate pruned Λ and its optimiser moments to 0 ─► at t >= T - tfinal: final pattern

Its ``state_dict`` (EMAs, masks, step, finalised) is in every checkpoint, so a resumed run continues exactly. The
schedule, the truncation and where it differs from PEFT: docs/adalora.md.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lora_lightning.allocation.budget import BudgetSchedule, top_b_masks, truncate
from lora_lightning.allocation.flat import flatten, unflatten
from lora_lightning.allocation.importance import ImportanceTracker, RankUnit
from lora_lightning.callbacks.rank_report import log_rank_heatmap, rank_summary, report_folder, write_rank_pattern
from lora_lightning.settings import AdaLoRASettings, RankSchedule
from lora_lightning.sharding import gathered_units

log = logging.getLogger(__name__)


class RankPruningScheduler(Callback):
    """Prune adapter ranks by AdaLoRA importance on the cubic budget schedule (METHODS.md §2).

    Every schedule option left ``None`` comes from the module's ``settings`` (the model's init_args in YAML); one
    given here overrides it for pruning (the PEFT export still records the module's settings).

    Args:
        tinit (int | float | None): warm-up steps with every rank kept; an int counts optimiser steps, a float is a
            fraction of the run.
        tfinal (int | float | None): final steps with the pattern fixed (int steps or float fraction).
        delta_t (int | None): optimiser steps between two masking events (>= 1).
        beta1 (float | None): EMA factor of the sensitivity, in [0, 1).
        beta2 (float | None): EMA factor of the uncertainty, in [0, 1).
        total_step (int | None): optimiser steps of the run; default the module's, else
            ``trainer.estimated_stepping_batches``.
        target_r (int | None): average rank to end with.
        report_dir (str | None): where to write ``rank_pattern.json`` at the end; default beside the checkpoints.
        log_heatmap (bool): log a layers × module-type image of kept ranks to TensorBoard at every masking event.
        importance (ImportanceTracker | None): the importance score (default ``ImportanceTracker(beta1, beta2)``,
            AdaLoRA's); research code
            passes a subclass of :class:`~lora_lightning.allocation.importance.ImportanceTracker` overriding
            ``update`` / ``triplet_scores`` (and ``state_dict`` / ``load_state_dict`` for extra state), e.g. from
            YAML as ``importance: {class_path: my_package.MyImportance}``.

    Extension points: ``importance`` (what is scored) and :meth:`build_schedule` (how many triplets stay when;
    override it in a subclass to return your own :class:`~lora_lightning.allocation.budget.BudgetSchedule`).
    """

    def __init__(
        self,
        tinit: int | float | None = None,
        tfinal: int | float | None = None,
        delta_t: int | None = None,
        beta1: float | None = None,
        beta2: float | None = None,
        total_step: int | None = None,
        target_r: int | None = None,
        report_dir: str | None = None,
        log_heatmap: bool = True,
        importance: ImportanceTracker | None = None,
    ) -> None:
        super().__init__()
        given = dict(tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2, total_step=total_step)
        self.overrides = {name: value for name, value in given.items() if value is not None}
        RankSchedule(**self.overrides)  # the options given here are checked now; merged with the module's in setup
        if target_r is not None and target_r < 0:
            raise ValueError(f"target_r must be >= 0, got {target_r}.")
        self.target_r = target_r
        self.importance = importance
        self.settings: AdaLoRASettings | None = None  # the module's settings with the overrides, set in setup
        self.report_dir, self.log_heatmap = report_dir, log_heatmap
        self.schedule: BudgetSchedule | None = None
        self.step = 0  # optimiser steps processed
        self.finalised = False
        self.disabled = False  # init_r == target_r: nothing to prune
        self.skipped_steps = 0  # steps left out of the EMAs (non-finite gradients)
        self.budget = 0
        self._loaded_masks: dict[str, torch.Tensor] | None = None
        self._module: weakref.ref | None = None

    # ----------------------------------------------------------------- set-up
    @staticmethod
    def units(pl_module: L.LightningModule) -> dict[str, RankUnit]:
        if not hasattr(pl_module, "rank_units"):
            raise TypeError(
                f"RankPruningScheduler needs a module with rank_units() (e.g. AdaLoRAModule); "
                f"{type(pl_module).__name__} has none."
            )
        return pl_module.rank_units()

    def merged_settings(self, pl_module: L.LightningModule, units: dict[str, RankUnit]) -> AdaLoRASettings:
        """The module's ``settings`` with this callback's explicit options (validated once more, merged)."""
        own = dict(self.overrides, **({"target_r": self.target_r} if self.target_r is not None else {}))
        base = getattr(pl_module, "settings", None)
        if isinstance(base, AdaLoRASettings):
            return replace(base, **own)
        if self.target_r is None:
            raise ValueError(f"RankPruningScheduler needs target_r: {type(pl_module).__name__} has no AdaLoRA "
                             "settings, so give RankPruningScheduler(target_r=...).")
        return AdaLoRASettings(init_r=max(u.rank for u in units.values()), **own)

    def build_schedule(self, units: dict[str, RankUnit], run: RankSchedule, target_r: int) -> BudgetSchedule:
        """The budget schedule of this run (called once, in ``setup``, with the settings resolved for the run);
        override to return a subclass of :class:`BudgetSchedule` (e.g. another ``budget(step)`` curve)."""
        return BudgetSchedule(
            init_budget=sum(u.rank for u in units.values()),
            target_budget=target_r * len(units),
            tinit=run.tinit,
            tfinal=run.tfinal,
            total_step=run.total_step,
            delta_t=run.delta_t,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._module = weakref.ref(pl_module)
        units = self.units(pl_module)
        if not units:
            raise ValueError("The module reports no rank units: there is nothing to prune.")
        self.settings = self.merged_settings(pl_module, units)
        target_r = self.settings.target_r
        if self.importance is None:
            self.importance = ImportanceTracker(self.settings.beta1, self.settings.beta2)
        ranks = {u.rank for u in units.values()}
        if ranks == {target_r}:
            warnings.warn(
                f"init_r == target_r == {target_r}: AdaLoRA has nothing to prune; training with fixed ranks.",
                stacklevel=2,
            )
            self.disabled = True
            return
        run = self.settings.resolved(trainer.estimated_stepping_batches)
        self.schedule = self.build_schedule(units, run, target_r)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded_masks is not None:  # resumed: the module's buffers come from the same checkpoint
            with torch.no_grad():
                for name, unit in self.units(pl_module).items():
                    if name in self._loaded_masks:
                        unit.mask.copy_(self._loaded_masks[name].to(unit.mask))
            self._loaded_masks = None
        if self.schedule is not None and self.step == 0:
            self.budget = self.schedule.init_budget

    # ----------------------------------------------------------------- the step
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.disabled or self.schedule is None:
            return
        step = trainer.global_step
        if step == self.step:  # a gradient-accumulation micro-batch: no optimiser step was taken
            return
        self.step = step
        self.allocate(pl_module, step, trainer)
        pl_module.log("train/budget", float(self.budget), on_step=True, on_epoch=False, batch_size=1)

    def allocate(self, pl_module: L.LightningModule, step: int, trainer: L.Trainer | None = None) -> bool:
        """Run step ``step`` of the schedule on the module's rank units; returns whether masks changed."""
        schedule = self.schedule
        if self.finalised:
            return False
        units = self.units(pl_module)
        measured = gathered_units(units)  # sharded (FSDP2) factors and grads whole: the same scores on every process
        if schedule.updates_importance(step):
            if not self.importance.update(measured):
                self.skipped_steps += 1
                log.warning("Step %d: non-finite or missing gradients, left out of the importance averages.", step)
        if step >= schedule.final_step:
            budget = schedule.target_budget
            self.finalised = True
        elif schedule.masks_at(step):
            budget = schedule.budget(step)
        else:
            return False
        masks = top_b_masks(self.importance.triplet_scores(measured), budget)
        masks = self._broadcast(masks, trainer)
        with torch.no_grad():
            # pruned now or before this event: Λ restarts from 0 (truncation), whatever happened in between
            kept_throughout = {name: unit.mask * masks[name].to(unit.mask) for name, unit in units.items()}
            for name, unit in units.items():
                unit.mask.copy_(masks[name].to(unit.mask))
        truncate(units, kept_throughout, trainer.optimizers if trainer is not None else ())
        self.budget = budget
        if trainer is not None:
            self._report_event(trainer, pl_module, units, step)
        return True

    @staticmethod
    def _broadcast(masks: dict[str, torch.Tensor], trainer: L.Trainer | None) -> dict[str, torch.Tensor]:
        if trainer is None or trainer.world_size == 1:
            return masks
        flat = trainer.strategy.broadcast(flatten(masks.values()), src=0)
        return dict(zip(masks, (m.cpu() for m in unflatten(flat, list(masks.values())))))

    # ----------------------------------------------------------------- visibility
    @staticmethod
    def kept_ranks(units: dict[str, RankUnit]) -> dict[str, int]:
        return {name: int(unit.mask.sum().item()) for name, unit in units.items()}

    def _report_event(self, trainer: L.Trainer, pl_module: L.LightningModule, units: dict[str, RankUnit],
                      step: int) -> None:
        if not trainer.is_global_zero or trainer.logger is None:
            return
        ranks = self.kept_ranks(units)
        trainer.logger.log_metrics({f"rank/{name}": float(r) for name, r in ranks.items()}, step=step)
        if self.log_heatmap:
            log_rank_heatmap(trainer.logger, ranks, step, tag="rank/heatmap")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule is None and not self.disabled:
            return
        if self.schedule is not None and not self.finalised and trainer.global_step >= self.schedule.total_step:
            self.allocate(pl_module, trainer.global_step, trainer)  # a run that overshot T without the final event
        if not trainer.is_global_zero:
            return
        ranks = self.kept_ranks(self.units(pl_module))
        folder = self.report_dir or report_folder(trainer)
        where = "not written: no checkpoint or log folder"
        if folder is not None:
            path = write_rank_pattern(Path(folder) / "rank_pattern.json", ranks, extra={
                "step": trainer.global_step, "final": self.finalised, "target_r": self.settings.target_r,
                "skipped_steps": self.skipped_steps,
            })
            where = f"pattern written to {path}"
        print(rank_summary(ranks, title=f"AdaLoRA kept ranks (step {trainer.global_step}; {where})"))

    # ----------------------------------------------------------------- state
    def __getstate__(self) -> dict[str, Any]:  # picklable for ddp_spawn: the module reference stays behind
        return {**self.__dict__, "_module": None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": self.importance.state_dict() if self.importance is not None else {},
            "step": self.step,
            "finalised": self.finalised,
            "budget": self.budget,
            "skipped_steps": self.skipped_steps,
            "masks": self._current_masks(),
        }

    def _current_masks(self) -> dict[str, torch.Tensor]:
        module = self._module() if self._module is not None else None
        if module is None:
            return {}
        return {n: u.mask.detach().cpu().clone() for n, u in self.units(module).items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.importance.load_state_dict(state_dict["importance"])
        self.step = int(state_dict["step"])
        self.finalised = bool(state_dict["finalised"])
        self.budget = int(state_dict["budget"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._loaded_masks = state_dict.get("masks") or None
