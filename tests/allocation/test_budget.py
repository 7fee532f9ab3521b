"""The cubic budget schedule (against hand values and PEFT's RankAllocator) and exact global top-b masking."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_lightning.allocation.budget import BudgetSchedule, resolve_steps, top_b_masks, truncate
from lora_lightning.allocation.importance import RankUnit


def test_budget_phases_hand_values():
    s = BudgetSchedule(init_budget=48, target_budget=32, tinit=10, tfinal=20, total_step=100, delta_t=5)
    assert s.budget(1) == s.budget(10) == 48
    assert s.budget(11) == int(16 * (1 - 1 / 70) ** 3 + 32)
    assert s.budget(45) == int(16 * 0.5**3 + 32) == 34
    assert s.budget(80) == s.budget(100) == s.budget(1000) == 32
    assert [t for t in range(1, 101) if s.masks_at(t)] == list(range(15, 80, 5))
    assert s.updates_importance(79) and not s.updates_importance(80)
    assert s.final_step == 80


def test_budget_equals_peft_rank_allocator_schedule():
    from peft.tuners.adalora.layer import RankAllocator

    cfg = SimpleNamespace(tinit=7, tfinal=13, total_step=91, deltaT=3, target_r=2)
    alloc = RankAllocator.__new__(RankAllocator)
    alloc.peft_config, alloc.init_bgt, alloc.target_bgt = cfg, 60, 10
    ours = BudgetSchedule(init_budget=60, target_budget=10, tinit=7, tfinal=13, total_step=91, delta_t=3)
    for t in range(1, 91 - 13):  # PEFT's model-level loop forces the final mask at t == T - tfinal
        budget, mask_ind = alloc.budget_schedule(t)
        assert ours.budget(t) == budget
        assert ours.masks_at(t) == mask_ind


def test_exact_budget_with_ties_and_deterministic_tie_break():
    scores = {"a": torch.tensor([1.0, 1.0, 0.5]), "b": torch.tensor([1.0, 2.0])}
    masks = top_b_masks(scores, 3)
    # 2.0 first, then the tied 1.0s in order: a[0], a[1] (b[0] loses the tie)
    assert masks["a"].tolist() == [1.0, 1.0, 0.0]
    assert masks["b"].tolist() == [0.0, 1.0]
    for b in range(6):
        assert sum(int(m.sum()) for m in top_b_masks(scores, b).values()) == b
    all_equal = {"a": torch.zeros(4), "b": torch.zeros(4)}
    assert top_b_masks(all_equal, 5)["a"].tolist() == [1.0] * 4
    assert top_b_masks(all_equal, 5)["b"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_nothing_to_prune_and_degenerate_budgets_never_crash():
    scores = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([float("nan"), 0.3])}
    assert all(m.tolist() == [1.0, 1.0] for m in top_b_masks(scores, 4).values())
    assert all(m.tolist() == [1.0, 1.0] for m in top_b_masks(scores, 99).values())
    assert all(m.sum() == 0 for m in top_b_masks(scores, 0).values())
    assert top_b_masks(scores, 3)["b"].tolist() == [0.0, 1.0]  # NaN ranks last


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="does not fit the run"):
        BudgetSchedule(48, 32, tinit=50, tfinal=50, total_step=100)
    with pytest.raises(ValueError, match="delta_t"):
        BudgetSchedule(48, 32, tinit=0, tfinal=0, total_step=100, delta_t=0)
    with pytest.raises(ValueError, match="exceeds"):
        BudgetSchedule(32, 48, tinit=0, tfinal=0, total_step=100)


def test_phases_as_fractions_of_the_run():
    assert resolve_steps(0.1, 250, "tinit") == 25
    assert resolve_steps(30, 250, "tinit") == 30
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        resolve_steps(1.5, 250, "tfinal")
    with pytest.raises(ValueError, match=">= 0"):
        resolve_steps(-1, 250, "tfinal")


# ----------------------------------------------------------------- truncation of pruned triplets
def trained_unit(optimizer_cls, **options):
    """A unit whose Λ has taken two optimiser steps (non-zero moments), with its optimiser."""
    lam = torch.nn.Parameter(torch.tensor([0.5, -0.3, 0.2, 0.7]))
    unit = RankUnit(torch.zeros(3, 4), lam, torch.zeros(4, 5), torch.ones(4), stored_lam=lam)
    optimizer = optimizer_cls([lam], lr=0.1, **options)
    for _ in range(2):
        lam.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
        optimizer.step()
    return unit, optimizer


@pytest.mark.parametrize("optimizer_cls, options, moments", [
    (torch.optim.AdamW, {}, ("exp_avg", "exp_avg_sq")),
    (torch.optim.Adam, {"amsgrad": True}, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    (torch.optim.SGD, {"momentum": 0.9}, ("momentum_buffer",)),
])
def test_truncate_zeroes_pruned_lambda_and_its_optimizer_state(optimizer_cls, options, moments):
    unit, optimizer = trained_unit(optimizer_cls, **options)
    state = optimizer.state[unit.lam]
    before = {k: v.clone() for k, v in state.items()}
    lam_before = unit.lam.detach().clone()
    assert all(before[m].ne(0).all() for m in moments)
    truncate({"u": unit}, {"u": torch.tensor([1.0, 0.0, 1.0, 0.0])}, [optimizer])
    assert unit.lam.tolist() == [lam_before[0].item(), 0.0, lam_before[2].item(), 0.0]
    for m in moments:
        assert state[m][1] == 0 and state[m][3] == 0, m
        assert torch.equal(state[m][[0, 2]], before[m][[0, 2]]), m
    if "step" in state:
        assert torch.equal(state["step"], before["step"])  # scalars are not per-entry state
    # masked entries get no gradient: they stay exactly 0 through further steps
    unit.lam.grad = torch.tensor([1.0, 0.0, 1.0, 0.0])
    optimizer.step()
    assert unit.lam[1] == 0 and unit.lam[3] == 0 and all(state[m][[1, 3]].eq(0).all() for m in moments)


def test_truncate_leaves_units_without_stored_lambda_and_unknown_optimizers_alone():
    unit, optimizer = trained_unit(torch.optim.AdamW)
    observed = RankUnit(unit.P, unit.lam, unit.Q, unit.mask)  # no stored_lam: masked only
    lam_before, state_before = unit.lam.detach().clone(), optimizer.state[unit.lam]["exp_avg"].clone()
    truncate({"u": observed}, {"u": torch.zeros(4)}, [optimizer])
    assert torch.equal(unit.lam.detach(), lam_before)
    assert torch.equal(optimizer.state[unit.lam]["exp_avg"], state_before)
    truncate({"u": unit}, {"u": torch.zeros(4)})  # no optimiser: Λ only
    assert unit.lam.eq(0).all() and torch.equal(optimizer.state[unit.lam]["exp_avg"], state_before)
