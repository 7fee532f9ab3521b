"""AdaLoRA (Zhang et al., ICLR 2023): SVD-form adapters whose ranks are pruned during training by importance.

The module owns the adapters (:class:`~lora_lightning.adapters.svd.SVDLinear`), the orthogonal regulariser (training
loss only) and the rank-unit interface; the pruning itself is :class:`~lora_lightning.callbacks.RankPruningScheduler`,
which the module installs through ``configure_callbacks`` unless the trainer already has one, so an "AdaLoRA" run can
never silently train with fixed ranks.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lora_lightning.adapters.svd import SVDLinear
from lora_lightning.allocation.budget import resolve_steps
from lora_lightning.allocation.importance import RankUnit, orthogonal_regularizer
from lora_lightning.callbacks.rank_pruning import RankPruningScheduler, validate_ranks
from lora_lightning.modules.base import AdapterModule, not_configured


class AdaLoRAModule(AdapterModule):
    """AdaLoRA over any backbone the base module loads (METHODS.md §2).

    Args:
        init_r: rank every adapted matrix starts with.
        target_r: average rank over adapted matrices at the end (the budget is ``target_r × n``).
        alpha: ΔW = P diag(Λ ⊙ m) Q · alpha / init_r (the scale stays fixed as ranks are pruned).
        dropout: dropout on the adapter input.
        orth_reg_weight: γ of the orthogonal regulariser (PEFT's default 0.5; the paper's GLUE runs mostly 0.1).
        tinit / tfinal: warm-up and final phases, in optimiser steps (int) or fractions of the run (float).
        delta_t: optimiser steps between masking events.
        beta1 / beta2: importance EMA factors.
        total_step: optimiser steps of the run; default ``trainer.estimated_stepping_batches``.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)
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
        **kwargs: Any,
    ) -> None:
        if init_r < 1:
            raise ValueError(f"init_r must be >= 1, got {init_r}.")
        validate_ranks(init_r, target_r)
        if orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}.")
        # Checked here, before any work: the scheduler repeats these checks when it is built.
        RankPruningScheduler(tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2)
        if total_step is not None:
            tinit_steps, tfinal_steps = resolve_steps(tinit, total_step, "tinit"), resolve_steps(tfinal, total_step, "tfinal")
            if tinit_steps + tfinal_steps >= total_step:
                raise ValueError(
                    f"The rank schedule does not fit the run: tinit ({tinit_steps}) + tfinal ({tfinal_steps}) must be "
                    f"less than total_step ({total_step})."
                )
        self.init_r, self.target_r, self.alpha, self.dropout = init_r, target_r, alpha, dropout
        self.orth_reg_weight = orth_reg_weight
        self.schedule_args = dict(tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2,
                                  total_step=total_step)
        super().__init__(*args, **kwargs)

    def make_adapter(self, name: str, layer: nn.Module) -> SVDLinear:
        return SVDLinear(layer, rank=self.init_r, alpha=self.alpha, dropout=self.dropout)

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

    def rank_pattern(self) -> dict[str, int]:
        """Kept rank per adapted matrix."""
        return {name: unit.kept_rank for name, unit in self.adapters.items() if isinstance(unit, SVDLinear)}

    def extra_losses(self) -> dict[str, Tensor]:
        if self.orth_reg_weight == 0:
            return {}
        pairs = [(u.P, u.Q) for u in self.rank_units().values()]
        return {"orth_reg": self.orth_reg_weight * orthogonal_regularizer(pairs)}

    def configure_callbacks(self):
        scheduler = RankPruningScheduler(**self.schedule_args, target_r=self.target_r)
        return [*super().configure_callbacks(), *not_configured(self._trainer, [scheduler])]  # a configured one wins
