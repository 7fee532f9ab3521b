"""Sensitivity-LoRA maths (METHODS.md §3): metrics and rank formula against hand-computed values, budget
properties, scale invariance, and the three Hessian-diagonal estimators against brute-force computations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_lightning.allocation.sensitivity import (
    ESTIMATORS,
    DiagonalStatistics,
    allocate_ranks,
    build_estimator,
    check_budget,
    effective_rank,
    fused_scores,
    global_sensitivity,
    register_estimator,
    sensitivity_allocation,
    topk_sensitivity,
)


# ------------------------------------------------------------------------------------------- metrics by hand
def test_metrics_against_hand_values():
    d = torch.tensor([1.0, 3.0, 0.5, 0.5])  # sorted: 3, 1, .5, .5; total 5
    assert global_sensitivity(d) == 5.0
    assert topk_sensitivity(d) == 2.0  # k = m/2 = 2: (3 + 1) / 2
    assert effective_rank(d, 0.85) == 3.0  # cumulative .6, .8, .9 -> first >= .85 at k = 3
    assert effective_rank(d, 0.6) == 1.0  # exactly reaching alpha counts
    assert effective_rank(torch.zeros(3)) == 0.0


def test_fused_score_against_hand_computation():
    diagonals = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([4.0, 0.0])}
    # by hand: S_g = 4, 2, 4; S_T (k=1) = 3, 1, 4; S_E (alpha .85) = 2, 2, 1
    def weight(xs):  # sigma / mu^2, population sigma
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs)) / mu**2

    beta1, beta2 = weight([3, 1, 4]), weight([2, 2, 1])
    local = {"a": beta1 * 3 + beta2 * 2, "b": beta1 * 1 + beta2 * 2, "c": beta1 * 4 + beta2 * 1}
    gamma1, gamma2 = weight([4, 2, 4]), weight(list(local.values()))
    theta = {n: gamma1 * g + gamma2 * local[n] for n, g in {"a": 4, "b": 2, "c": 4}.items()}

    scores = fused_scores(diagonals)
    for name in diagonals:
        assert scores[name]["local"] == pytest.approx(local[name], rel=1e-12)
        assert scores[name]["theta"] == pytest.approx(theta[name], rel=1e-12)
    # the allocation: r_total = 3 * 4 = 12 split by theta with largest remainders
    ideal = {n: theta[n] / sum(theta.values()) * 12 for n in theta}
    allocation = sensitivity_allocation(diagonals, r_avg=4)
    assert sum(allocation.ranks.values()) == 12
    for name in ideal:
        assert abs(allocation.ranks[name] - ideal[name]) < 1


# ------------------------------------------------------------------------------------------- rank formula
def test_allocate_exact_proportions():
    assert allocate_ranks({"a": 1, "b": 2, "c": 5}, 16) == {"a": 2, "b": 4, "c": 10}


def test_largest_remainder_rounding_and_ties():
    # 10/3 each: floors 3, 3, 3; one unit left goes to the first of equal remainders
    assert allocate_ranks({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    # 12 / 13 of (2.6, 3.9, 6.5) = 2.4, 3.6, 6.0 -> floors 2, 3, 6 (11); one unit to the largest remainder (.6)
    assert allocate_ranks({"a": 2.6, "b": 3.9, "c": 6.5}, 12) == {"a": 2, "b": 4, "c": 6}
    # 13 of the same: floors 2, 3, 6; two units, to remainders .9 then .6
    assert allocate_ranks({"a": 2.6, "b": 3.9, "c": 6.5}, 13) == {"a": 3, "b": 4, "c": 6}


def test_clamps_redistribute():
    # c would get 11.76 > r_max 6: clamped, the other 6 split equally
    assert allocate_ranks({"a": 1, "b": 1, "c": 98}, 12, r_min=1, r_max=6) == {"a": 3, "b": 3, "c": 6}
    # a would get 0 < r_min 2: raised, the remaining 7 split 3.5 / 3.5 (tie -> first)
    assert allocate_ranks({"a": 0, "b": 1, "c": 1}, 9, r_min=2) == {"a": 2, "b": 4, "c": 3}
    # all-zero scores: uniform
    assert allocate_ranks({"a": 0, "b": 0}, 6) == {"a": 3, "b": 3}


@pytest.mark.parametrize("seed", range(20))
def test_ranks_sum_to_budget_within_bounds(seed):
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=generator))
    scores = torch.rand(n, generator=generator) ** 4 * 10 ** float(torch.randint(-3, 4, (1,), generator=generator))
    r_avg = int(torch.randint(1, 9, (1,), generator=generator))
    r_min = int(torch.randint(1, r_avg + 1, (1,), generator=generator))
    r_max = r_avg + int(torch.randint(0, 8, (1,), generator=generator))
    ranks = allocate_ranks({str(i): float(s) for i, s in enumerate(scores)}, r_avg * n, r_min, r_max)
    assert sum(ranks.values()) == r_avg * n
    assert all(r_min <= r <= r_max for r in ranks.values())
    # monotone: a larger score never gets a smaller rank
    order = sorted(range(n), key=lambda i: float(scores[i]))
    assert all(ranks[str(a)] <= ranks[str(b)] + 1 for a, b in zip(order, order[1:]))


def test_scaling_all_diagonals_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    diagonals = {f"m{i}": torch.rand(16 + 8 * i, generator=generator, dtype=torch.float64) ** 3 for i in range(7)}
    reference = sensitivity_allocation(diagonals, r_avg=6, r_max=20)
    for factor in (1e-6, 3.7, 1e8):
        scaled = sensitivity_allocation({k: v * factor for k, v in diagonals.items()}, r_avg=6, r_max=20)
        assert scaled.ranks == reference.ranks
        for name in diagonals:
            assert scaled.scores[name]["theta"] == pytest.approx(reference.scores[name]["theta"], rel=1e-9)


# ------------------------------------------------------------------------------------------- bad budgets
def test_budget_errors():
    with pytest.raises(ValueError, match="below r_min"):
        check_budget(5, r_avg=1, r_min=2)
    with pytest.raises(ValueError, match="r_max=3 is below the average"):
        check_budget(5, r_avg=4, r_max=3)
    with pytest.raises(ValueError, match="No adapted matrices"):
        check_budget(0, r_avg=4)
    with pytest.raises(ValueError, match="Unknown sensitivity estimator 'nope'"):
        build_estimator("nope")


def test_empty_statistics_error():
    with pytest.raises(ValueError, match="reached no adapted layer"):
        DiagonalStatistics().diagonals()
    stats = DiagonalStatistics()
    stats.add("a", torch.zeros(3), 0)
    with pytest.raises(ValueError, match="reached no adapted layer"):
        stats.diagonals()


def test_statistics_flatten_round_trip():
    stats = DiagonalStatistics()
    stats.add("b", torch.tensor([1.0, 2.0]), 3)
    stats.add("a", torch.tensor([4.0]), 5)
    back = stats.unflatten(stats.flatten() * 2)
    assert back.counts == {"a": 10.0, "b": 6.0}
    assert torch.equal(back.sums["b"], torch.tensor([2.0, 4.0], dtype=torch.float64))


# ------------------------------------------------------------------------------------------- estimators
class TinyNet(nn.Module):
    """Two linear layers over token features: enough for exact Hessians, masks and cross-layer curvature."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(3, 2)

    def forward(self, features, attention_mask=None, labels=None):
        hidden = torch.tanh(self.first(features))
        logits = self.second(hidden)  # (batch, seq, 2)
        mask = attention_mask.unsqueeze(-1).to(logits.dtype)
        return (logits * mask).sum(1) / mask.sum(1)


def tiny_batches(n=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[0, -2:] = 0
        features = torch.randn(2, 5, 4, generator=generator)
        features[0, -2:] = 100.0  # padding with huge values: must not count
        batches.append({"features": features, "attention_mask": mask,
                        "labels": torch.randint(0, 2, (2,), generator=generator)})
    return batches


def tiny_loss(model):
    return lambda batch: nn.functional.cross_entropy(model(batch["features"], batch["attention_mask"]), batch["labels"])


def test_activation_estimator_is_two_sum_x_squared_over_tokens():
    model, batches = TinyNet(), tiny_batches()
    layers = {"first": model.first, "second": model.second}
    stats = build_estimator("activation")(model, layers, batches, tiny_loss(model))
    tokens = torch.cat([b["features"][b["attention_mask"].bool()] for b in batches])  # (N, 4)
    expected_first = 2 * tokens.double().square().sum(0) / tokens.shape[0]
    hidden = torch.tanh(model.first(tokens)).detach().double()
    expected_second = 2 * hidden.square().sum(0) / tokens.shape[0]
    diagonals = stats.diagonals()
    assert stats.counts["first"] == tokens.shape[0] == 3 * 8
    torch.testing.assert_close(diagonals["first"], expected_first, rtol=1e-10, atol=0)
    torch.testing.assert_close(diagonals["second"], expected_second, rtol=1e-6, atol=0)
    weighted = build_estimator("activation")(model, layers, batches, tiny_loss(model), weight_by_dout=True)
    torch.testing.assert_close(weighted.diagonals()["first"], 3 * expected_first, rtol=1e-10, atol=0)


def test_fisher_estimator_is_mean_squared_batch_gradient():
    model, batches = TinyNet(), tiny_batches()
    layers = {"first": model.first, "second": model.second}
    flags = [p.requires_grad for p in model.parameters()]
    model.first.weight.requires_grad_(False)  # frozen base weights, as in a LoRA model
    stats = build_estimator("fisher")(model, layers, batches, tiny_loss(model))
    assert not model.first.weight.requires_grad and model.second.weight.requires_grad == flags[2]  # restored
    expected = {"first": 0, "second": 0}
    for batch in batches:
        with torch.enable_grad():
            weights = [model.first.weight.detach().requires_grad_(), model.second.weight.detach().requires_grad_()]
            hidden = torch.tanh(nn.functional.linear(batch["features"], weights[0], model.first.bias))
            logits = nn.functional.linear(hidden, weights[1], model.second.bias)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            loss = nn.functional.cross_entropy((logits * mask).sum(1) / mask.sum(1), batch["labels"])
            g1, g2 = torch.autograd.grad(loss, weights)
        expected["first"] += g1.double().square() / len(batches)
        expected["second"] += g2.double().square() / len(batches)
    diagonals = stats.diagonals()
    torch.testing.assert_close(diagonals["first"], expected["first"].mean(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(diagonals["second"], expected["second"].mean(0), rtol=1e-6, atol=1e-12)
    assert model.first.weight.grad is None  # nothing left behind for an optimiser


def test_hutchinson_estimator_matches_explicit_hessian_diagonal():
    model, batches = TinyNet(), tiny_batches(n=2)
    layers = {"first": model.first, "second": model.second}
    w1, w2 = model.first.weight.detach(), model.second.weight.detach()
    sizes = [w1.numel(), w2.numel()]

    def loss_of(flat):
        a, b = flat[: sizes[0]].view_as(w1), flat[sizes[0]:].view_as(w2)
        total = 0.0
        for batch in batches:
            hidden = torch.tanh(nn.functional.linear(batch["features"].double(), a, model.first.bias.double()))
            logits = nn.functional.linear(hidden, b, model.second.bias.double())
            mask = batch["attention_mask"].unsqueeze(-1).double()
            total = total + nn.functional.cross_entropy((logits * mask).sum(1) / mask.sum(1), batch["labels"])
        return total / len(batches)  # the mean over batches of z ⊙ H_b z has expectation diag of the mean Hessian

    hessian = torch.autograd.functional.hessian(loss_of, torch.cat([w1.flatten(), w2.flatten()]).double())
    diag = hessian.diagonal()
    # per-probe standard deviation of z_i (Hz)_i is sqrt(sum_{k != i} H_ik^2); bound the channel mean by the sum
    off = (hessian.square().sum(1) - diag.square()).clamp_min(0).sqrt()
    probes = 300
    stats = build_estimator("hutchinson", num_probes=probes, seed=1)(model, layers, batches, tiny_loss(model))
    diagonals = stats.diagonals()
    assert stats.counts["first"] == 2 * probes
    for name, (start, shape) in {"first": (0, w1.shape), "second": (sizes[0], w2.shape)}.items():
        exact = diag[start:start + shape.numel()].view(shape).mean(0)
        bound = off[start:start + shape.numel()].view(shape).mean(0) / math.sqrt(stats.counts[name])
        error = (diagonals[name] - exact).abs()
        assert (error <= 5 * bound + 1e-9).all(), (name, error, bound)
    assert model.first.weight.grad is None


def test_hutchinson_runs_on_a_transformers_backbone_and_restores_attention(tiny_llama):
    from lora_lightning.modules import SensitivityLoRAModule

    module = SensitivityLoRAModule(backbone=tiny_llama, task="causal-lm", r_avg=2, target_modules=["q_proj", "v_proj"])
    before = module.backbone.config._attn_implementation
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    layers = {n: layer.base_layer for n, layer in module.lora_layers().items()}
    module.eval()
    stats = build_estimator("hutchinson", num_probes=2)(module.backbone, layers, [batch], module.calibration_loss)
    assert module.backbone.config._attn_implementation == before
    assert all(torch.isfinite(v).all() and v.shape == (32,) for v in stats.diagonals().values())
    assert all(p.requires_grad is False for n, p in module.backbone.named_parameters() if "base_layer" in n)


def test_custom_estimator_registration():
    @register_estimator("ones-test")
    class Ones:
        def __call__(self, model, layers, batches, loss_fn, *, weight_by_dout=False):
            stats = DiagonalStatistics()
            for name, layer in layers.items():
                stats.add(name, torch.ones(layer.in_features), 1)
            return stats

    try:
        model = TinyNet()
        stats = build_estimator("ones-test")(model, {"first": model.first}, [], None)
        assert torch.equal(stats.diagonals()["first"], torch.ones(4, dtype=torch.float64))
    finally:
        ESTIMATORS.pop("ones-test")
