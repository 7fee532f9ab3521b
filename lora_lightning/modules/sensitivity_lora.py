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

from lora_lightning.allocation.sensitivity import Allocation, lora_parameter_count, sensitivity_allocation
from lora_lightning.modules.lora import LoRABase
from lora_lightning.settings import SensitivityLoRASettings

CHECKPOINT_SECTION = "sensitivity_lora"


class SensitivityLoRAModule(LoRABase):
    """LoRA with ranks allocated from second-order sensitivity (Zhang et al., EMNLP Findings 2025).

    Args:
        r_avg (float): the budget as the average rank; ``round(r_avg · n)`` ranks are split over the ``n`` adapted
            matrices (the paper: 4 for NLU, 8 for NLG).
        r_min (int): lower bound on every matrix's rank (>= 1).
        r_max (int | None): upper bound on every matrix's rank (``None``: no bound but the budget).
        estimator (str): Hessian-diagonal estimator, ``activation`` (the paper's, forward only), ``fisher`` or
            ``hutchinson``, or a name registered with
            :func:`~lora_lightning.allocation.sensitivity.register_estimator`.
        num_batches (int): calibration batches per process.
        num_probes (int): Rademacher probes per batch (``hutchinson``).
        weight_by_dout (bool): weigh each matrix's diagonal by its output size (sum, not mean, over rows).
        topk_ratio (float): the paper's k = m · topk_ratio (0.5), in (0, 1].
        effrank_alpha (float): the effective rank's energy threshold α (0.85), in (0, 1].
        alpha (float): as :class:`LoRAModule`; the scaling of each module is ``alpha / r_w``.
        dropout (float): dropout on the adapter input, in [0, 1).
        alpha_pattern (dict[str, float] | None): per-module alphas, as :class:`LoRAModule`.
        (everything else: see :class:`~lora_lightning.modules.base.AdapterModule`)

    Ranks are not arguments: the allocation decides them (``kept_ranks()`` after it; ``LoRAModule`` for fixed
    ranks). The validated values are ``self.settings`` (:class:`~lora_lightning.settings.SensitivityLoRASettings`).
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
        alpha: float = 16.0,
        dropout: float = 0.0,
        alpha_pattern: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Bad input fails here, before the backbone is loaded.
        self.settings = SensitivityLoRASettings(
            r_avg=r_avg, r_min=r_min, r_max=r_max, estimator=estimator, num_batches=num_batches,
            num_probes=num_probes, weight_by_dout=weight_by_dout, topk_ratio=topk_ratio, effrank_alpha=effrank_alpha,
            alpha=alpha, dropout=dropout, alpha_pattern=alpha_pattern,
        )
        if kwargs.get("quantization", "none") != "none" and estimator in ("fisher", "hutchinson"):
            raise ValueError(
                f"The '{estimator}' estimator differentiates the base weights, which a quantised base "
                f"(quantization: {kwargs['quantization']}) does not have in floating point; use estimator: activation."
            )
        if kwargs.get("base_from_rank0"):
            raise ValueError(
                "Sensitivity-LoRA calibrates on every process's whole model before it is sharded (Lightning runs the "
                "estimator's setup before configure_model), so every process must read the base: set "
                "base_from_rank0: false."
            )
        self.allocation: dict[str, int] | None = None
        self.allocation_report: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------------- allocation
    def calibration_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The task loss on one batch (what the loss-based estimators differentiate)."""
        return self.task.loss(self(dict(batch)), batch)

    def allocate(self, diagonals: Mapping[str, Tensor]) -> Allocation:
        """Ranks from Hessian diagonals under this module's budget (pure; changes nothing)."""
        s = self.settings
        return sensitivity_allocation(diagonals, s.r_avg, s.r_min, s.r_max, s.topk_ratio, s.effrank_alpha)

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
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
        self.allocation_report = dict(report or {})
        self.allocation_report["trainable_lora_parameters"] = lora_parameter_count(self.allocation, shapes)
        self.allocation_report["ranks"] = dict(self.allocation)

    # ----------------------------------------------------------------- callbacks and checkpoints
    def method_callbacks(self) -> list:
        from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator

        return [*super().method_callbacks(), HessianSensitivityEstimator()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_SECTION] = {
            "rank_pattern": self.kept_ranks(),
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
