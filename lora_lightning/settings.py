"""Each method's settings: one frozen, validated dataclass per method (no Lightning import).

    YAML init_args (flat) ──► module builds XSettings once (validated here, before the backbone loads)
                              └─► module.settings ──► its callback (RankPruningScheduler, HessianSensitivityEstimator,
                                                      HypernetWarmup) and export.py read it; nothing writes back.

A callback configured explicitly (YAML ``trainer.callbacks`` or ``Trainer(callbacks=...)``) may override its own
options; any option it leaves ``None`` comes from the module's settings.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Self

from lora_lightning.adapters.base import check_alpha
from lora_lightning.adapters.hyper import MODES as HYPERNET_MODES
from lora_lightning.adapters.hyper import SCALINGS as HYPERNET_SCALINGS
from lora_lightning.adapters.hyper import TOKENS as HYPERNET_TOKENS
from lora_lightning.allocation.budget import check_phases, resolve_steps
from lora_lightning.allocation.importance import check_betas
from lora_lightning.allocation.sensitivity import check_budget_bounds, check_estimator_name


def pattern_value(name: str, pattern: dict[str, Any], default: Any) -> Any:
    """The value of the first key of ``pattern`` that is a suffix of ``name`` or a regex matching it whole."""
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return value
    return default


def _check_scale(alpha: float, dropout: float) -> None:
    check_alpha(alpha)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")


@dataclass(frozen=True)
class LoRASettings:
    """Plain LoRA: ΔW = (alpha / rank) B A, with per-module overrides keyed by name suffix or regex (as in PEFT)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))  # YAML may give null
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        _check_scale(self.alpha, self.dropout)
        for name, rank in {"rank": self.rank, **self.rank_pattern}.items():
            if int(rank) < 1:
                raise ValueError(f"A LoRA rank must be >= 1, got {rank} for '{name}'.")
        for name, alpha in self.alpha_pattern.items():
            _check_scale(alpha, self.dropout)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(name, self.rank_pattern, self.rank))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern, self.alpha))


@dataclass(frozen=True)
class RankSchedule:
    """AdaLoRA's pruning schedule: phases in optimiser steps (int) or fractions of the run (float), events every
    ``delta_t`` steps, importance EMA factors; ``total_step`` ``None`` means the trainer's estimate."""

    tinit: int | float = 0
    tfinal: int | float = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    total_step: int | None = None

    def __post_init__(self) -> None:
        check_betas(self.beta1, self.beta2)
        steps = max(1, self.total_step or 1)  # type and range of tinit/tfinal now; the fit once the run is known
        check_phases(resolve_steps(self.tinit, steps, "tinit"), resolve_steps(self.tfinal, steps, "tfinal"),
                     self.total_step, self.delta_t)
        if self._fractions() >= 1:
            raise ValueError(f"tinit ({self.tinit}) and tfinal ({self.tfinal}) as fractions of the run leave no steps "
                             "to prune in; their sum must be below 1.")

    def _fractions(self) -> float:
        return sum(value for value in (self.tinit, self.tfinal) if isinstance(value, float))

    def shortest_run(self) -> int:
        """The fewest total steps this schedule fits in (tinit + tfinal < total_step)."""
        steps = sum(value for value in (self.tinit, self.tfinal) if not isinstance(value, float))
        return math.ceil((steps + 1) / (1 - self._fractions()))

    def resolved(self, estimated_steps: int | float) -> Self:
        """These settings for one run: ``total_step`` (its own, else ``estimated_steps``) and phases as int steps."""
        total = self.total_step if self.total_step is not None else estimated_steps
        if total is None or total == float("inf"):
            raise ValueError("The run has no step limit: set max_steps/max_epochs, or total_step.")
        total = int(total)
        return replace(self, tinit=resolve_steps(self.tinit, total, "tinit"),
                       tfinal=resolve_steps(self.tfinal, total, "tfinal"), total_step=total)


@dataclass(frozen=True)
class AdaLoRASettings(RankSchedule):
    """AdaLoRA: ranks start at ``init_r`` and are pruned to an average ``target_r`` on :class:`RankSchedule`;
    ΔW = P diag(Λ ⊙ m) Q · alpha / init_r; ``orth_reg_weight`` is γ of the orthogonal regulariser;
    ``lambda_lr_boost`` / ``lambda_boost_steps``: Λ's learning rate × (1 + boost · (1 − t / steps)) for the first
    steps (the control of a front-loaded hypernetwork, issue 13; 0: off)."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    orth_reg_weight: float = 0.5
    lambda_lr_boost: float = 0.0
    lambda_boost_steps: int | float = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_scale(self.alpha, self.dropout)
        if self.init_r < 1:
            raise ValueError(f"init_r must be >= 1, got {self.init_r}.")
        if self.target_r < 0:
            raise ValueError(f"target_r must be >= 0, got {self.target_r}.")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) cannot exceed init_r ({self.init_r}): AdaLoRA only prunes.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if self.lambda_lr_boost < 0:
            raise ValueError(f"lambda_lr_boost must be >= 0, got {self.lambda_lr_boost}.")
        resolve_steps(self.lambda_boost_steps, 1, "lambda_boost_steps")

    def peft_schedule(self) -> dict[str, Any]:
        """``target_r``, the schedule (in steps) and ``orth_reg_weight`` as PEFT's ``AdaLoraConfig`` names them.
        Settings without a ``total_step`` (a module never fit: no run length) use the shortest run PEFT accepts."""
        run = self.resolved(self.shortest_run())
        return {"target_r": run.target_r, "tinit": run.tinit, "tfinal": run.tfinal,
                "deltaT": run.delta_t, "beta1": run.beta1, "beta2": run.beta2,
                "orth_reg_weight": run.orth_reg_weight, "total_step": run.total_step}


@dataclass(frozen=True)
class SensitivityLoRASettings:
    """Sensitivity-LoRA: a budget of ``round(r_avg · n)`` ranks split over the ``n`` adapted matrices within
    ``[r_min, r_max]`` from Hessian-diagonal estimates (``estimator`` over ``num_batches`` batches), then plain LoRA
    with scaling ``alpha / r_w`` (``alpha_pattern`` per module, as LoRA)."""

    r_avg: float = 4
    r_min: int = 1
    r_max: int | None = None
    estimator: str = "activation"
    num_batches: int = 16
    num_probes: int = 1
    weight_by_dout: bool = False
    topk_ratio: float = 0.5
    effrank_alpha: float = 0.85
    alpha: float = 16.0
    dropout: float = 0.0
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        check_estimator_name(self.estimator)
        check_budget_bounds(self.r_avg, self.r_min, self.r_max)
        _check_scale(self.alpha, self.dropout)
        if self.num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {self.num_batches}.")
        if self.num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {self.num_probes}.")
        if not 0 < self.topk_ratio <= 1 or not 0 < self.effrank_alpha <= 1:
            raise ValueError(
                f"topk_ratio and effrank_alpha must lie in (0, 1], got {self.topk_ratio}, {self.effrank_alpha}.")

    def rank_for(self, name: str) -> int:
        """The rank every matrix holds until the allocation: the average, rounded (the module is usable as is)."""
        return max(self.r_min, int(round(self.r_avg)))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(name, self.alpha_pattern, self.alpha))


@dataclass(frozen=True)
class HypernetSettings:
    """The attention hypernetwork of HyperAdaLoRA/HyperLoRA: ``mode`` (``residual``, ``recurrent``, ``seeded``),
    encoder width ``hidden`` and ``heads``, the ``hypernet`` param group's ``lr`` (``None``: a ratio of the
    module's learning rate) and its ``warmup`` (int steps or float run fraction); ``tokens`` (``factor``: a rank
    token is one factor's column/row; ``triplet``: the whole triplet, projected without bias) and ``scaling``
    (``none``, ``gains``: learnable per-matrix output gains, ``grad_rms``: each matrix's gradient into the generator
    normalised to unit RMS); ``fold_at`` (steps or run fraction, ``None``: never): the ``hypernet`` group's LR
    decays linearly to 0 by then, when the generated factors are folded into the base factors and the generators
    leave the step (``residual`` mode only)."""

    mode: str = "residual"
    hidden: int = 64
    heads: int = 4
    lr: float | None = None
    warmup: int | float = 0.1
    tokens: str = "factor"
    scaling: str = "none"
    fold_at: int | float | None = None

    def __post_init__(self) -> None:
        if self.mode not in HYPERNET_MODES:
            raise ValueError(f"Unknown hypernet mode '{self.mode}'; choose one of {list(HYPERNET_MODES)}.")
        if self.tokens not in HYPERNET_TOKENS:
            raise ValueError(f"Unknown hypernet_tokens '{self.tokens}'; choose one of {list(HYPERNET_TOKENS)}.")
        if self.scaling not in HYPERNET_SCALINGS:
            raise ValueError(f"Unknown hypernet_scaling '{self.scaling}'; choose one of {list(HYPERNET_SCALINGS)}.")
        if self.fold_at is not None:
            resolve_steps(self.fold_at, 1, "hypernet_fold_at")
            if self.mode != "residual":
                raise ValueError(f"hypernet_fold_at folds generated factors into trainable base factors: it needs "
                                 f"mode='residual', not '{self.mode}'.")
        if self.hidden < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"hypernet_hidden ({self.hidden}) must be a positive multiple of hypernet_heads "
                             f"({self.heads}).")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"hypernet_lr must be > 0, got {self.lr}.")
        resolve_steps(self.warmup, 1, "hypernet_warmup")  # type and range; steps once the run length is known
