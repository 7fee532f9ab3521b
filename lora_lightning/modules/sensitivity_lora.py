"""Sensitivity-LoRA (METHODS.md §3): plain LoRA whose per-module ranks are decided once, before training, from
the Hessian diagonal of every adapted matrix.

The module holds the budget (``r_avg``, ``r_min``, ``r_max``) and the allocation; the
:class:`~lora_lightning.callbacks.sensitivity.HessianSensitivityEstimator` callback (installed automatically
through ``configure_callbacks``) calibrates in ``setup``, before DDP wraps the model and before optimisers exist,
and calls :meth:`SensitivityLoRAModule.apply_allocation`. The rank pattern is checkpoint content: loading a
checkpoint reshapes the adapters before their weights are loaded, and a resumed fit does not recalibrate.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.allocation.sensitivity import (
    Allocation,
    check_estimator_name,
    lora_parameter_count,
    sensitivity_allocation,
)
from lora_lightning.modules.base import not_configured
from lora_lightning.modules.lora import LoRAModule

CHECKPOINT_SECTION = "sensitivity_lora"


class SensitivityLoRAModule(LoRAModule):
    """LoRA with ranks allocated from second-order sensitivity (Zhang et al., EMNLP Findings 2025).

    Args:
        r_avg: the budget as the average rank; ``round(r_avg · n)`` ranks are split over the ``n`` adapted
            matrices (the paper: 4 for NLU, 8 for NLG).
        r_min / r_max: bounds on every matrix's rank (``r_max=None``: no upper bound but the budget).
        estimator: Hessian-diagonal estimator, ``activation`` (the paper's, forward only), ``fisher`` or
            ``hutchinson``, or a name registered with
            :func:`~lora_lightning.allocation.sensitivity.register_estimator`.
        num_batches: calibration batches per process.
        num_probes: Rademacher probes per batch (``hutchinson``).
        weight_by_dout: weigh each matrix's diagonal by its output size (sum, not mean, over rows).
        topk_ratio / effrank_alpha: the paper's k = m/2 and α = 0.85.
        alpha / dropout / alpha_pattern: as :class:`LoRAModule`; the scaling of each module is ``alpha / r_w``.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)
    """

    def __init__(
        self,
        *args: Any,
        r_avg: float = 4,
        r_min: int = 1,
        r_max: int | None = None,
        estimator: str = "activation",
        num_batches: int = 16,
        num_probes: int = 1,
        weight_by_dout: bool = False,
        topk_ratio: float = 0.5,
        effrank_alpha: float = 0.85,
        **kwargs: Any,
    ) -> None:
        # Bad input fails here, before the backbone is loaded.
        check_estimator_name(estimator)
        if kwargs.get("quantization", "none") != "none" and estimator in ("fisher", "hutchinson"):
            raise ValueError(
                f"The '{estimator}' estimator differentiates the base weights, which a quantised base "
                f"(quantization: {kwargs['quantization']}) does not have in floating point; use estimator: activation."
            )
        if r_min < 1:
            raise ValueError(f"r_min must be >= 1, got {r_min}.")
        if r_avg < r_min:
            raise ValueError(f"The budget r_avg={r_avg} is below r_min={r_min} per matrix; raise r_avg or lower r_min.")
        if r_max is not None and r_max < r_avg:
            raise ValueError(f"r_max={r_max} is below the average rank r_avg={r_avg}: the budget cannot be spent.")
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        if not 0 < topk_ratio <= 1 or not 0 < effrank_alpha <= 1:
            raise ValueError(f"topk_ratio and effrank_alpha must lie in (0, 1], got {topk_ratio}, {effrank_alpha}.")
        for fixed in ("rank", "rank_pattern"):
            if kwargs.get(fixed):
                raise ValueError(
                    f"SensitivityLoRAModule decides ranks itself; '{fixed}' is not an argument (give the budget "
                    "as r_avg, r_min, r_max, or use LoRAModule for fixed ranks)."
                )
        kwargs.pop("rank", None)
        kwargs.pop("rank_pattern", None)
        self.allocation: dict[str, int] | None = None
        self.allocation_report: dict[str, Any] | None = None
        # Until allocation every matrix holds the average rank (rounded), so the module is usable as is.
        super().__init__(*args, rank=max(r_min, int(round(r_avg))), **kwargs)
        for hparams in (self._hparams, self._hparams_initial):  # ranks are not arguments of this method
            hparams.pop("rank", None)
            hparams.pop("rank_pattern", None)

    # ----------------------------------------------------------------- allocation
    def lora_layers(self) -> dict[str, LoRALinear]:
        return {name: layer for name, layer in self.adapters.items() if isinstance(layer, LoRALinear)}

    def calibration_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The task loss on one batch (what the loss-based estimators differentiate)."""
        return self.task.loss(self(dict(batch)), batch)

    def allocate(self, diagonals: Mapping[str, Tensor]) -> Allocation:
        """Ranks from Hessian diagonals under this module's budget (pure; changes nothing)."""
        hp = self.hparams
        return sensitivity_allocation(diagonals, hp.r_avg, hp.r_min, hp.r_max, hp.topk_ratio, hp.effrank_alpha)

    def apply_allocation(self, ranks: Mapping[str, int], report: dict[str, Any] | None = None) -> None:
        """Give each LoRA layer its rank (fresh factors where the rank changes). Only before an optimiser exists."""
        layers = self.lora_layers()
        if set(ranks) != set(layers):
            missing, extra = sorted(set(layers) - set(ranks)), sorted(set(ranks) - set(layers))
            raise ValueError(f"The rank pattern does not fit this model: missing {missing[:5]}, unknown {extra[:5]}.")
        for name, layer in layers.items():
            if layer.rank != int(ranks[name]):
                layer.reset_rank(int(ranks[name]))
        self.allocation = {name: int(ranks[name]) for name in layers}
        self.rank_pattern = dict(self.allocation)  # LoRAModule's pattern, by full module name
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
        self.allocation_report = dict(report or {})
        self.allocation_report["trainable_lora_parameters"] = lora_parameter_count(self.allocation, shapes)
        self.allocation_report["ranks"] = dict(self.allocation)

    # ----------------------------------------------------------------- callbacks and checkpoints
    def configure_callbacks(self):
        from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator

        return [*super().configure_callbacks(), *not_configured(self._trainer, [HessianSensitivityEstimator()])]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_SECTION] = {
            "rank_pattern": {name: layer.rank for name, layer in self.lora_layers().items()},
            "allocated": self.allocation is not None,
            "report": self.allocation_report,
        }

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        """Adapter weights carry their ranks: reshape to the ``lora_A`` shapes first (ddp_spawn hands the trained
        weights back to the main process this way, without a checkpoint), then load as the base module does."""
        layers = self.lora_layers()
        ranks = {name: state_dict[f"backbone.{name}.lora_A"].shape[0] for name in layers
                 if f"backbone.{name}.lora_A" in state_dict}
        if len(ranks) == len(layers) and any(layers[n].rank != r for n, r in ranks.items()):
            self.apply_allocation(ranks, self.allocation_report)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Reshape the adapters from the saved rank pattern before ``load_state_dict`` sees the weights."""
        super().on_load_checkpoint(checkpoint)
        section = checkpoint.get(CHECKPOINT_SECTION)
        if section is None:
            return
        self.apply_allocation(section["rank_pattern"], section.get("report"))
        if not section.get("allocated", True):
            self.allocation = None
