"""AdaLoRA (Zhang et al., ICLR 2023): SVD-form adapters whose ranks are pruned during training by importance.

The module owns the adapters (:class:`~lora_lightning.adapters.svd.SVDLinear`), the orthogonal regulariser (training
loss only), the rank-unit interface and the validated :class:`~lora_lightning.settings.AdaLoRASettings`; the pruning
itself is :class:`~lora_lightning.callbacks.RankPruningScheduler`, which reads those settings and which the module
installs through ``configure_callbacks`` unless the trainer already has one, so an "AdaLoRA" run can never silently
train with fixed ranks.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import Tensor, nn

from lora_lightning.adapters.svd import SVDLinear
from lora_lightning.allocation.budget import resolve_steps
from lora_lightning.allocation.importance import RankUnit, orthogonal_regularizer
from lora_lightning.callbacks.rank_pruning import RankPruningScheduler
from lora_lightning.group_lr import restore_group_lrs, scale_group_lr
from lora_lightning.modules.base import AdapterModule
from lora_lightning.settings import AdaLoRASettings

RUN_SETTINGS_KEY = "adalora_run_settings"
LAMBDA_GROUP = "lambda"


class AdaLoRAModule(AdapterModule):
    """AdaLoRA over any backbone the base module loads (METHODS.md §2).

    Args:
        init_r (int): rank every adapted matrix starts with (>= 1).
        target_r (int): average rank over adapted matrices at the end (the budget is ``target_r × n``; <= init_r).
        alpha (float): ΔW = P diag(Λ ⊙ m) Q · alpha / init_r (the scale stays fixed as ranks are pruned).
        dropout (float): dropout on the adapter input, in [0, 1).
        orth_reg_weight (float): γ of the orthogonal regulariser (PEFT's default 0.5; the paper's GLUE runs 0.1).
        tinit (int | float): warm-up with every rank kept, in optimiser steps (int) or a fraction of the run (float).
        tfinal (int | float): final phase with the pattern fixed, in steps (int) or a fraction of the run (float).
        delta_t (int): optimiser steps between masking events.
        beta1 (float): EMA factor of the sensitivity, in [0, 1).
        beta2 (float): EMA factor of the uncertainty, in [0, 1).
        total_step (int | None): optimiser steps of the run; default ``trainer.estimated_stepping_batches``.
        lambda_lr_boost (float): extra learning rate on Λ alone, as a multiple of its scheduled rate, decaying
            linearly to 0 over ``lambda_boost_steps`` (Λ gets its own param group ``lambda``; 0: off, one group).
            The control of HyperAdaLoRA's front-loaded generator (issue 13).
        lambda_boost_steps (int | float): steps (int) or run fraction (float) of that boost.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)

    ``self.settings`` holds these values validated; ``self.run_settings`` the same with the steps of the last fit
    resolved (saved in checkpoints; the PEFT export writes them).
    """

    def __init__(
        self,
        *args: Any,
        init_r: int = 12,
        target_r: int = 8,
        alpha: float = 32.0,
        dropout: float = 0.0,
        orth_reg_weight: float = 0.5,
        tinit: int | float = 0,
        tfinal: int | float = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        total_step: int | None = None,
        lambda_lr_boost: float = 0.0,
        lambda_boost_steps: int | float = 0,
        **kwargs: Any,
    ) -> None:
        self.settings = AdaLoRASettings(
            init_r=init_r, target_r=target_r, alpha=alpha, dropout=dropout, orth_reg_weight=orth_reg_weight,
            tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2, total_step=total_step,
            lambda_lr_boost=lambda_lr_boost, lambda_boost_steps=lambda_boost_steps,
        )
        self.run_settings: AdaLoRASettings | None = None
        self.lambda_boost_until = 0  # lambda_boost_steps in steps, once the run length is known (setup)
        super().__init__(*args, **kwargs)

    def make_adapter(self, name: str, layer: nn.Module) -> SVDLinear:
        return SVDLinear(layer, rank=self.settings.init_r, alpha=self.settings.alpha, dropout=self.settings.dropout)

    # ----------------------------------------------------------------- the rank-unit interface
    def rank_units(self) -> dict[str, RankUnit]:
        """Per adapted matrix, its leaf ``(P, Λ, Q)`` parameters and rank-mask buffer; Λ is also the tensor that
        pruning truncates (see RankPruningScheduler)."""
        return {
            name: RankUnit(layer.lora_P, layer.lora_lambda, layer.lora_Q, layer.rank_mask,
                           stored_lam=layer.lora_lambda)
            for name, layer in self.adapters.items()
            if isinstance(layer, SVDLinear)
        }

    def kept_ranks(self) -> dict[str, int]:
        """Kept rank per adapted matrix."""
        return {name: unit.kept_rank for name, unit in self.adapters.items() if isinstance(unit, SVDLinear)}

    def extra_losses(self) -> dict[str, Tensor]:
        if self.settings.orth_reg_weight == 0:
            return {}
        pairs = [(u.P, u.Q) for u in self.rank_units().values()]
        return {"orth_reg": self.settings.orth_reg_weight * orthogonal_regularizer(pairs)}

    def method_callbacks(self) -> list:
        return [*super().method_callbacks(), RankPruningScheduler()]

    # ----------------------------------------------------------------- the Λ learning-rate boost (a control)
    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.settings.lambda_lr_boost == 0:
            return groups
        lams = {id(layer.lora_lambda) for layer in self.adapters.values() if isinstance(layer, SVDLinear)}
        split = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in lams]
            split.append({**group, "params": rest})
            if group.get("name") == "adapters":
                split.append({**group, "name": LAMBDA_GROUP, "params": [p for p in group["params"] if id(p) in lams]})
        return split

    def lambda_lr_factor(self, step: int) -> float:
        """Factor on the ``lambda`` group's scheduled LR at optimiser step ``step`` (0-based)."""
        until = self.lambda_boost_until
        return 1.0 + self.settings.lambda_lr_boost * max(0.0, 1.0 - step / until) if until else 1.0

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        factor = self.lambda_lr_factor(self.trainer.global_step) if self.settings.lambda_lr_boost else 1.0
        scheduled = scale_group_lr(optimizer, LAMBDA_GROUP, factor) if factor != 1.0 else []
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:  # the LR scheduler never sees the boost
            restore_group_lrs(scheduled)

    # ----------------------------------------------------------------- the run's resolved settings
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.run_settings = self.settings.resolved(self.trainer.estimated_stepping_batches)
            self.lambda_boost_until = resolve_steps(self.settings.lambda_boost_steps, self.run_settings.total_step,
                                                    "lambda_boost_steps")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.run_settings is not None:
            checkpoint[RUN_SETTINGS_KEY] = asdict(self.run_settings)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if RUN_SETTINGS_KEY in checkpoint:  # absent from checkpoints written before it existed
            self.run_settings = AdaLoRASettings(**checkpoint[RUN_SETTINGS_KEY])
