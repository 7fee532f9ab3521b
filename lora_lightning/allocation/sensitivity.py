"""Sensitivity-LoRA (Zhang, Huang, Li et al., Findings of EMNLP 2025): ranks decided once, before training,
from the Hessian diagonal of every adapted matrix. Plain torch (no Lightning); the maths is METHODS.md §3, the
estimators and our reading of the gaps docs/sensitivity_lora.md.

::

    calibration batches ─► estimator (activation | fisher | hutchinson | registered) ─► DiagonalStatistics
    (sums and counts per matrix, all-reducible) ─► diagonals ─► fused_scores (trace, top-k, effective rank, σ/μ²
    weights → θ) ─► allocate_ranks (θ-proportional, clamped to [r_min, r_max], summing to round(r_avg · n))

Contract of an estimator (:class:`SensitivityEstimator`, registered with :func:`register_estimator`): for every
adapted matrix, a per-input-channel sum of Hessian-diagonal values and its count; per-element estimates are
averaged over output rows (summed with ``weight_by_dout``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lora_lightning.adapters.base import linear_shape
from lora_lightning.allocation.flat import flatten, unflatten

# ---------------------------------------------------------------------------------------------------- estimators

LossFn = Callable[[Mapping[str, Tensor]], Tensor]
"""``loss_fn(batch) -> scalar`` the task loss of the model on one batch (used by loss-based estimators)."""


@dataclass
class DiagonalStatistics:
    """Accumulated Hessian-diagonal statistics: ``sums[name]`` (float64, length ``d_in``) over ``counts[name]``
    samples (tokens for ``activation``, batches × probes for the others). The diagonal is ``sums / counts``."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: Tensor, count: float) -> None:
        value = value.detach().to(torch.float64)
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def diagonals(self) -> dict[str, Tensor]:
        """``{name: sums / counts}``; a clear error when a matrix saw no data."""
        empty = [name for name, count in self.counts.items() if count <= 0]
        if empty or not self.sums:
            raise ValueError(
                f"The calibration data reached no adapted layer ({empty[:3] or 'no batches'}): "
                "give non-empty batches with at least one non-padding token."
            )
        return {name: self.sums[name] / self.counts[name] for name in self.sums}

    def flatten(self) -> Tensor:
        """Sums then counts (names sorted) in one float64 vector: one all-reduce moves all of them."""
        return flatten([*(self.sums[n] for n in sorted(self.sums)), self._counts()])

    def unflatten(self, flat: Tensor) -> DiagonalStatistics:
        """Statistics of the same names and shapes read back from a (reduced) :meth:`flatten` vector."""
        names = sorted(self.sums)
        *sums, counts = unflatten(flat, [*(self.sums[n] for n in names), self._counts()])
        return DiagonalStatistics(
            sums={n: s.clone() for n, s in zip(names, sums)}, counts=dict(zip(names, counts.tolist()))
        )

    def _counts(self) -> Tensor:
        names = sorted(self.sums)
        return torch.tensor([self.counts[n] for n in names], dtype=torch.float64, device=self.sums[names[0]].device)


@runtime_checkable
class SensitivityEstimator(Protocol):
    """What an estimator is: a callable that runs the model over calibration batches and returns
    :class:`DiagonalStatistics` with one ``d_in`` vector per entry of ``layers``.

    Args:
        model: the backbone (adapters in place; their update is zero before training, so it is the base model).
        layers: ``{name: linear layer}`` — the frozen base layers of the adapted matrices (``nn.Linear`` or
            ``Conv1D``).
        batches: calibration batches (dicts of tensors already on the model's device).
        loss_fn: the task loss of ``model`` on a batch.
        weight_by_dout: sum over output rows instead of averaging (see the module docstring).
    """

    def __call__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        batches: Iterable[Mapping[str, Tensor]],
        loss_fn: LossFn,
        *,
        weight_by_dout: bool = False,
    ) -> DiagonalStatistics: ...


ESTIMATORS: dict[str, Callable[..., SensitivityEstimator]] = {}


def register_estimator(name: str) -> Callable:
    """Class or factory decorator: ``@register_estimator("mine")`` makes ``estimator="mine"`` available.
    The registered object is called with the estimator options (``build_estimator(name, **options)``) and must
    return a :class:`SensitivityEstimator`."""

    def decorator(factory: Callable[..., SensitivityEstimator]) -> Callable[..., SensitivityEstimator]:
        ESTIMATORS[name] = factory
        return factory

    return decorator


def _import_estimator(name: str) -> None:
    """``"package.module.Name"``: import the module (its ``@register_estimator`` decorators run) and, if the
    dotted name is still unknown, register the attribute ``Name`` under it. Lets a YAML config name an estimator
    of research code that nothing else imports."""
    module_name, _, attribute = name.rpartition(".")
    if not module_name:
        return
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    if name not in ESTIMATORS and callable(getattr(module, attribute, None)):
        ESTIMATORS[name] = getattr(module, attribute)


def check_estimator_name(name: str) -> None:
    """A clear error for an unknown estimator; a dotted ``module.Name`` is imported first (see above)."""
    if name not in ESTIMATORS:
        _import_estimator(name)
    if name not in ESTIMATORS:
        raise ValueError(
            f"Unknown sensitivity estimator '{name}'; choose one of {sorted(ESTIMATORS)} "
            "or register your own with lora_lightning.allocation.sensitivity.register_estimator "
            "(or give it as an importable 'package.module.ClassName')."
        )


def build_estimator(name: str, **options: Any) -> SensitivityEstimator:
    check_estimator_name(name)
    return ESTIMATORS[name](**options)


def weight_to_input_channels(layer: nn.Module, per_element: Tensor, weight_by_dout: bool) -> Tensor:
    """Reduce a per-element quantity shaped like ``layer.weight`` to one value per input channel:
    the mean over output rows, or their sum when ``weight_by_dout``."""
    row_dim = 1 if isinstance(layer, Conv1D) else 0
    reduced = per_element.to(torch.float64).sum(dim=row_dim)
    return reduced if weight_by_dout else reduced / per_element.shape[row_dim]


def _token_mask(batch: Mapping[str, Tensor]) -> Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.bool()


@register_estimator("activation")
class ActivationEstimator:
    """The paper's Hessian: diagonal of GPTQ's ``2 X Xᵀ / N`` from layer inputs, padding tokens excluded
    (METHODS.md §3). Forward hooks on the base layers; float64 accumulation; no gradients."""

    def __call__(self, model, layers, batches, loss_fn, *, weight_by_dout: bool = False) -> DiagonalStatistics:
        stats = DiagonalStatistics()
        current: dict[str, Tensor | None] = {"mask": None}

        def make_hook(name: str, layer: nn.Module):
            d_out, _ = linear_shape(layer)  # not the weight's shape: a 4-bit weight is packed

            def hook(_module, inputs):
                x = inputs[0].detach()
                mask = current["mask"]
                if mask is not None and x.shape[:-1] == mask.shape:
                    x = x[mask]
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                value = 2.0 * x.square().sum(dim=0)
                stats.add(name, value * d_out if weight_by_dout else value, x.shape[0])

            return hook

        handles = [layer.register_forward_pre_hook(make_hook(name, layer)) for name, layer in layers.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    current["mask"] = _token_mask(batch)
                    model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for handle in handles:
                handle.remove()
        return stats


@contextmanager
def base_weight_gradients(layers: Mapping[str, nn.Module]) -> Iterator[list[Tensor]]:
    """Inside the block only the base weights of ``layers`` require grad; everything is restored after.
    Used before any optimiser or DDP wrapper exists (docs/architecture.md: allocation before wrapping)."""
    weights = [layer.weight for layer in layers.values()]
    previous = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield weights
    finally:
        for w, flag in zip(weights, previous):
            w.requires_grad_(flag)


@contextmanager
def frozen_except(model: nn.Module, keep: list[Tensor]) -> Iterator[None]:
    """Temporarily freeze every parameter of ``model`` not in ``keep`` (so backward computes only what we use)."""
    keep_ids = {id(t) for t in keep}
    params = [p for p in model.parameters() if id(p) not in keep_ids]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous):
            p.requires_grad_(flag)


@register_estimator("fisher")
class FisherEstimator:
    """Diagonal empirical Fisher of the frozen weights: mean over batches of the squared batch-loss gradient,
    reduced to input channels by :func:`weight_to_input_channels`."""

    def __call__(self, model, layers, batches, loss_fn, *, weight_by_dout: bool = False) -> DiagonalStatistics:
        stats = DiagonalStatistics()
        names = list(layers)
        with base_weight_gradients(layers) as weights, frozen_except(model, weights), torch.enable_grad():
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(batch), weights, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is None:
                        grad = torch.zeros_like(layers[name].weight)
                    stats.add(name, weight_to_input_channels(layers[name], grad.square(), weight_by_dout), 1)
        return stats


@contextmanager
def double_backward_attention(model: nn.Module) -> Iterator[None]:
    """Fused SDPA / flash kernels have no double backward. Switch a ``transformers`` model to eager attention
    for the block (restored after) and restrict any remaining SDPA call to the math kernel."""
    switched = None
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            switched = current
        except (ValueError, ImportError, AttributeError):  # eager unsupported: math SDPA still works
            switched = None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # pragma: no cover - older torch
        kernel = nullcontext()
    try:
        with kernel:
            yield
    finally:
        if switched is not None:
            model.set_attn_implementation(switched)


@register_estimator("hutchinson")
class HutchinsonEstimator:
    """Diagonal of the task-loss Hessian w.r.t. each frozen weight, ``E[z ⊙ Hz]`` with Rademacher probes
    (Hutchinson; Bekas et al. 2007), ``num_probes`` per batch, double backward. Reduced to input channels
    by :func:`weight_to_input_channels`.

    Args:
        num_probes: probes per calibration batch.
        seed: seed of the probe generator (each distributed rank should pass its own to draw independent probes).
    """

    def __init__(self, num_probes: int = 1, seed: int = 0) -> None:
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}.")
        self.num_probes, self.seed = num_probes, seed

    def __call__(self, model, layers, batches, loss_fn, *, weight_by_dout: bool = False) -> DiagonalStatistics:
        stats = DiagonalStatistics()
        names = list(layers)
        with base_weight_gradients(layers) as weights, frozen_except(model, weights), torch.enable_grad(), \
                double_backward_attention(model):
            generator = torch.Generator(device=weights[0].device).manual_seed(self.seed)
            for batch in batches:
                grads = torch.autograd.grad(loss_fn(batch), weights, create_graph=True, allow_unused=True)
                used = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for probe in range(self.num_probes):
                    zs = [
                        torch.randint(0, 2, weights[i].shape, generator=generator, device=weights[i].device)
                        .to(weights[i].dtype) * 2 - 1
                        for i, _ in used
                    ]
                    dot = sum((g * z).sum() for (_, g), z in zip(used, zs))
                    hvps = torch.autograd.grad(
                        dot, [weights[i] for i, _ in used], retain_graph=probe < self.num_probes - 1,
                        allow_unused=True,
                    )
                    products = {i: z * (h if h is not None else torch.zeros_like(z)) for (i, _), z, h in
                                zip(used, zs, hvps)}
                    for i, name in enumerate(names):
                        value = products.get(i, torch.zeros_like(layers[name].weight))
                        stats.add(name, weight_to_input_channels(layers[name], value, weight_by_dout), 1)
        return stats


# ---------------------------------------------------------------------------------------------------- allocation


def global_sensitivity(diagonal: Tensor) -> float:
    """``S_g = Σ_j λ_j``: the trace of the (diagonal) Hessian (METHODS.md §3, "global")."""
    return float(diagonal.to(torch.float64).sum())


def topk_sensitivity(diagonal: Tensor, ratio: float = 0.5) -> float:
    """``S_T``: mean of the ``k = max(1, ⌊ratio · m⌋)`` largest diagonal entries (the paper's k = m/2)."""
    values = diagonal.to(torch.float64).flatten()
    k = max(1, int(ratio * values.numel()))
    return float(values.topk(k).values.mean())


def effective_rank(diagonal: Tensor, alpha: float = 0.85) -> float:
    """``S_E = min{k : Σ_{j≤k} λ_j / Σ_j λ_j ≥ α}`` on the diagonal sorted descending (1-based; 0 if Σλ = 0)."""
    values = diagonal.to(torch.float64).flatten().clamp_min(0).sort(descending=True).values
    total = values.sum()
    if total <= 0:
        return 0.0
    cumulative = values.cumsum(0) / total
    # tolerance so that e.g. exactly 0.85 counts as reaching α despite rounding
    return float(int((cumulative < alpha - 1e-12).sum()) + 1)


def dispersion_weight(values: Iterable[float]) -> float:
    """The paper's metric weight ``σ / μ²`` over all adapted matrices (population σ); 0 when μ = 0.
    Multiplying a metric by its weight makes it invariant to the metric's scale."""
    x = torch.tensor(list(values), dtype=torch.float64)
    mean = x.mean()
    if mean == 0:
        return 0.0
    return float(x.std(unbiased=False) / mean.square())


def fused_scores(
    diagonals: Mapping[str, Tensor], topk_ratio: float = 0.5, effrank_alpha: float = 0.85
) -> dict[str, dict[str, float]]:
    """Per matrix: ``global``, ``topk``, ``effrank``, ``local = β1 S_T + β2 S_E`` and ``theta = γ1 S_g + γ2 S_l``,
    each β/γ the σ/μ² of its metric over all matrices (METHODS.md §3). Scaling every diagonal by one constant
    leaves ``theta`` unchanged."""
    names = list(diagonals)
    s_g = {n: global_sensitivity(diagonals[n]) for n in names}
    s_t = {n: topk_sensitivity(diagonals[n], topk_ratio) for n in names}
    s_e = {n: effective_rank(diagonals[n], effrank_alpha) for n in names}
    beta1, beta2 = dispersion_weight(s_t.values()), dispersion_weight(s_e.values())
    s_l = {n: beta1 * s_t[n] + beta2 * s_e[n] for n in names}
    gamma1, gamma2 = dispersion_weight(s_g.values()), dispersion_weight(s_l.values())
    return {
        n: {
            "global": s_g[n], "topk": s_t[n], "effrank": s_e[n], "local": s_l[n],
            "theta": gamma1 * s_g[n] + gamma2 * s_l[n],
        }
        for n in names
    }


def check_budget_bounds(r_avg: float, r_min: int = 1, r_max: int | None = None) -> None:
    """A clear error for a budget that no number of matrices can meet."""
    if r_min < 1:
        raise ValueError(f"r_min must be >= 1 (a LoRA layer needs at least rank 1), got {r_min}.")
    if r_avg < r_min:
        raise ValueError(
            f"The budget r_avg={r_avg} is below r_min={r_min} per matrix; raise r_avg or lower r_min."
        )
    if r_max is not None and r_max < r_avg:
        raise ValueError(f"r_max={r_max} is below the average rank r_avg={r_avg}: the budget cannot be spent.")


def check_budget(num_matrices: int, r_avg: float, r_min: int = 1, r_max: int | None = None) -> int:
    """Validate a budget before any work; returns ``r_total = round(r_avg · n)``."""
    if num_matrices < 1:
        raise ValueError("No adapted matrices: there is nothing to allocate ranks to.")
    check_budget_bounds(r_avg, r_min, r_max)
    r_total = int(round(r_avg * num_matrices))
    if r_total < r_min * num_matrices:
        raise ValueError(f"r_total={r_total} cannot give every one of {num_matrices} matrices r_min={r_min}.")
    return r_total


def allocate_ranks(
    scores: Mapping[str, float], r_total: int, r_min: int = 1, r_max: int | None = None
) -> dict[str, int]:
    """Integer ranks proportional to ``scores`` that sum to ``r_total`` exactly, each in ``[r_min, r_max]``.

    The paper's ``r_w = θ_w / Σθ · r_total`` (METHODS.md §3) leaves rounding and bounds open. Ours: the real
    allocation ``x_w = clip(t · θ_w, r_min, r_max)`` with ``t`` chosen so that ``Σ x_w = r_total`` (what clamping
    and redistributing the excess proportionally converges to), then largest-remainder rounding: floors, and the
    leftover units to the largest fractional parts (ties by order). All-zero scores give a uniform allocation.
    """
    names = list(scores)
    n = len(names)
    r_max = r_total if r_max is None else r_max
    if r_min * n > r_total or r_max * n < r_total:
        raise ValueError(f"Cannot split r_total={r_total} over {n} matrices within [{r_min}, {r_max}].")
    theta = torch.tensor([max(0.0, float(scores[k])) for k in names], dtype=torch.float64)
    if not torch.isfinite(theta).all():
        raise ValueError(f"Sensitivity scores must be finite, got {dict(zip(names, theta.tolist()))}.")
    if theta.sum() <= 0:
        theta = torch.ones(n, dtype=torch.float64)

    def spread(t: float) -> Tensor:
        return (t * theta).clamp(r_min, r_max)

    # t ↦ Σ clip(t θ) is monotone: bisect on t, then solve the unclamped set exactly.
    low, high = 0.0, 1.0
    while spread(high).sum() < r_total and high < 1e300:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if spread(mid).sum() < r_total else (low, mid)
    t = high
    at_min = t * theta <= r_min
    at_max = (t * theta >= r_max) & ~at_min
    free = ~(at_min | at_max)
    x = torch.where(at_min, float(r_min), torch.where(at_max, float(r_max), 0.0)).to(torch.float64)
    remaining = r_total - float(x[~free].sum())
    if free.any():
        x[free] = theta[free] / theta[free].sum() * remaining if theta[free].sum() > 0 else remaining / int(free.sum())
    x = x.clamp(r_min, r_max)

    ranks = x.floor()
    leftover = int(round(r_total - float(ranks.sum())))
    fractions = (x - ranks).tolist()
    order = sorted(range(n), key=lambda i: (-fractions[i], i))
    while leftover != 0:  # a float round-off may leave a unit either way; cycles at most a few times
        step = 1 if leftover > 0 else -1
        moved = False
        for i in order if step > 0 else reversed(order):
            if leftover == 0:
                break
            if r_min <= ranks[i] + step <= r_max:
                ranks[i] += step
                leftover -= step
                moved = True
        if not moved:  # pragma: no cover - excluded by the feasibility check above
            raise RuntimeError("rank rounding could not meet the budget")
    return {name: int(r) for name, r in zip(names, ranks.tolist())}


@dataclass
class Allocation:
    """The result of :func:`sensitivity_allocation`: integer ranks and the per-matrix metrics behind them."""

    ranks: dict[str, int]
    scores: dict[str, dict[str, float]]
    r_total: int


def sensitivity_allocation(
    diagonals: Mapping[str, Tensor],
    r_avg: float,
    r_min: int = 1,
    r_max: int | None = None,
    topk_ratio: float = 0.5,
    effrank_alpha: float = 0.85,
) -> Allocation:
    """Hessian diagonals → fused scores θ → integer ranks summing to ``round(r_avg · n)`` (METHODS.md §3)."""
    r_total = check_budget(len(diagonals), r_avg, r_min, r_max)
    scores = fused_scores(diagonals, topk_ratio, effrank_alpha)
    ranks = allocate_ranks({n: s["theta"] for n, s in scores.items()}, r_total, r_min, r_max)
    for name, rank in ranks.items():
        scores[name]["rank"] = rank
    return Allocation(ranks=ranks, scores=scores, r_total=r_total)


def lora_parameter_count(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    """Trainable LoRA parameters ``Σ r_w (d_in + d_out)`` of an allocation; ``shapes[name] = (d_out, d_in)``."""
    return sum(rank * (shapes[name][0] + shapes[name][1]) for name, rank in ranks.items())
