"""The cubic budget schedule (against hand values and PEFT's RankAllocator) and exact global top-b masking."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_lightning.allocation.budget import BudgetSchedule, resolve_steps, top_b_masks


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
