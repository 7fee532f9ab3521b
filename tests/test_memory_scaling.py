"""benchmarks/memory_scaling.py: the memory model recovers known coefficients, reports its leave-one-out error,
and a setup measured at too few token counts borrows another setup's per-token term."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_scaling as bench  # noqa: E402

SHAPES = [(135e6, 30, 576), (498e6, 28, 1024), (1.54e9, 28, 1536)]  # params, layers, hidden


def rows(coef, points):
    return [{"params": p, "layers": layers, "hidden": hidden, "tokens": tokens,
             "peak_rss_mib": float(sum(c * f for c, f in zip(coef, bench.features(p, tokens, layers, hidden))))}
            for (p, layers, hidden), tokens in points]


def test_the_fit_recovers_the_coefficients_and_predicts_other_models():
    coef = [4 / 2**20, 20 / 2**20, 600.0]  # MiB per param and per activation element; constant MiB
    measured = rows(coef, [(SHAPES[0], 256), (SHAPES[0], 1024), (SHAPES[1], 256), (SHAPES[1], 1024), (SHAPES[2], 1024)])
    fit = bench.fit_memory_model(measured)
    assert fit["bytes_per_param"] == pytest.approx(4) and fit["bytes_per_activation"] == pytest.approx(20)
    assert fit["constant_mib"] == pytest.approx(600)
    assert fit["max_loo_error"] < 1e-6 and fit["per_token_from"] is None
    noisy = [dict(r, peak_rss_mib=r["peak_rss_mib"] * (1.1 if i == 2 else 1)) for i, r in enumerate(measured)]
    assert bench.fit_memory_model(noisy)["max_loo_error"] > 0.05  # one row off by 10 %: leave-one-out shows it
    expected = (4 * 7.62e9 + 20 * 4096 * 28 * 3584) / 2**30 + 600 / 1024
    assert bench.predict_gib(fit, 7.62e9, 4096, 28, 3584) == pytest.approx(expected)


def test_too_few_token_counts_borrow_the_per_token_terms_or_give_no_fit():
    coef = [2 / 2**20, 20 / 2**20, 500.0]
    short = rows(coef, [(SHAPES[0], 16), (SHAPES[0], 32), (SHAPES[1], 16)])  # b only from 16 vs 32 tokens: not fitted
    assert bench.fit_memory_model(short) is None
    fit = bench.fit_memory_model(short, per_token=coef[1])
    assert fit["bytes_per_param"] == pytest.approx(2) and fit["constant_mib"] == pytest.approx(500)
    assert fit["per_token_from"] is not None and fit["max_loo_error"] < 1e-6
    assert bench.fit_memory_model(short[:2], per_token=coef[1]) is None  # one size: a is not identifiable
