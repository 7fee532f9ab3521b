"""AdaLoRA importance: EMAs against hand-computed values, triplet scores, skipped steps, the orthogonal penalty."""
from __future__ import annotations

import pytest
import torch

from lora_lightning.allocation.importance import ImportanceTracker, RankUnit, orthogonal_regularizer


def make_unit(p, lam, q, gp, glam, gq) -> RankUnit:
    unit = RankUnit(torch.tensor(p), torch.tensor(lam), torch.tensor(q), torch.ones(len(lam)))
    for t, g in ((unit.P, gp), (unit.lam, glam), (unit.Q, gq)):
        t.grad = None if g is None else torch.tensor(g)
    return unit


def test_ema_and_triplet_scores_match_hand_computation():
    tracker = ImportanceTracker(beta1=0.5, beta2=0.75)
    # P (2 × 2), Λ (2,), Q (2 × 1)
    unit = make_unit([[1.0, 2.0], [3.0, -1.0]], [2.0, -1.0], [[4.0], [1.0]],
                     [[1.0, 1.0], [1.0, 2.0]], [3.0, 1.0], [[0.5], [2.0]])
    assert tracker.update({"m": unit})
    # Step 1: I = |w g|; Ī = 0.5 I; Ū = 0.25 |I - Ī| = 0.125 I; s = Ī Ū = 0.0625 I²
    i_lam = torch.tensor([6.0, 1.0])
    assert torch.allclose(tracker.exp_avg_ipt["m.lam"], 0.5 * i_lam)
    assert torch.allclose(tracker.exp_avg_unc["m.lam"], 0.125 * i_lam)
    # Step 2 with the same values: I again; Ī = 0.75 I; Ū = 0.75·0.125 I + 0.25·0.25 I = 0.15625 I
    assert tracker.update({"m": unit})
    assert torch.allclose(tracker.exp_avg_ipt["m.lam"], 0.75 * i_lam)
    assert torch.allclose(tracker.exp_avg_unc["m.lam"], 0.15625 * i_lam)
    k = 0.75 * 0.15625
    i_p = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    i_q = torch.tensor([[2.0], [2.0]])
    expected = k * (i_lam**2 + (i_q**2).mean(1) + (i_p**2).mean(0))
    scores = tracker.triplet_scores({"m": unit})["m"]
    assert torch.allclose(scores, expected)
    assert scores.tolist() == pytest.approx([k * (36 + 4 + 5), k * (1 + 4 + 4)])


def test_non_finite_gradient_skips_the_whole_step_and_keeps_state():
    tracker = ImportanceTracker()
    good = make_unit([[1.0]], [1.0], [[1.0]], [[1.0]], [2.0], [[1.0]])
    tracker.update({"m": good})
    before = {k: v.clone() for k, v in tracker.exp_avg_ipt.items()}
    for bad in (float("nan"), float("inf")):
        poisoned = make_unit([[1.0]], [1.0], [[1.0]], [[1.0]], [bad], [[1.0]])
        assert not tracker.update({"m": poisoned})
    assert all(torch.equal(before[k], tracker.exp_avg_ipt[k]) for k in before)
    assert all(torch.isfinite(s).all() for s in tracker.triplet_scores({"m": good}).values())


def test_none_gradient_skips_only_that_tensor():
    tracker = ImportanceTracker(beta1=0.5, beta2=0.5)
    unit = make_unit([[1.0]], [1.0], [[1.0]], None, [2.0], None)
    assert tracker.update({"m": unit})
    assert set(tracker.exp_avg_ipt) == {"m.lam"}
    assert tracker.triplet_scores({"m": unit})["m"].tolist() == [pytest.approx(1.0 * 0.5)]  # Ī=1, Ū=0.5


def test_no_gradient_at_all_is_a_skipped_step():
    unit = make_unit([[1.0]], [1.0], [[1.0]], None, None, None)
    tracker = ImportanceTracker()
    assert not tracker.update({"m": unit})
    assert tracker.triplet_scores({"m": unit})["m"].tolist() == [0.0]


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_betas_outside_unit_interval_are_rejected(beta):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ImportanceTracker(beta1=beta)
    with pytest.raises(ValueError, match="beta2"):
        ImportanceTracker(beta2=beta)


def test_state_dict_round_trip_is_exact():
    tracker = ImportanceTracker()
    unit = make_unit([[1.0, 2.0]], [1.0, 3.0], [[1.0], [2.0]], [[0.3, 0.1]], [2.0, 1.0], [[1.0], [0.5]])
    tracker.update({"m": unit})
    copy = ImportanceTracker()
    copy.load_state_dict(tracker.state_dict())
    tracker.update({"m": unit}), copy.update({"m": unit})
    assert torch.equal(tracker.triplet_scores({"m": unit})["m"], copy.triplet_scores({"m": unit})["m"])


def test_orthogonal_regularizer_zero_for_orthonormal_and_matches_peft_formula():
    q, _ = torch.linalg.qr(torch.randn(6, 3))
    assert orthogonal_regularizer([(q, q.T)]).item() == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(0)
    pairs = [(torch.randn(5, 3), torch.randn(3, 4)), (torch.randn(2, 3), torch.randn(3, 7))]
    eye = torch.eye(3)
    # PEFT: sum over every lora_A (QQᵀ) and lora_B (PᵀP) of the unsquared Frobenius norm, divided by their count
    expected = sum(torch.norm(p.T @ p - eye, p="fro") + torch.norm(q @ q.T - eye, p="fro") for p, q in pairs) / 4
    assert orthogonal_regularizer(pairs).item() == pytest.approx(expected.item(), rel=1e-6)
