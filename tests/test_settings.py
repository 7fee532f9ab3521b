"""lora_lightning.settings: each method's settings validated once, in one place, and resolved for a run."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from lora_lightning.settings import (
    AdaLoRASettings,
    HypernetSettings,
    LoRASettings,
    RankSchedule,
    SensitivityLoRASettings,
)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (LoRASettings, dict(rank=0), "rank must be >= 1, got 0 for 'rank'"),
        (LoRASettings, dict(rank_pattern={"query": 0}), "got 0 for 'query'"),
        (LoRASettings, dict(alpha=0), "alpha must be > 0"),
        (LoRASettings, dict(alpha_pattern={"query": -1.0}), "alpha must be > 0"),
        (LoRASettings, dict(dropout=1.0), r"dropout must lie in \[0, 1\)"),
        (RankSchedule, dict(delta_t=0), "delta_t must be >= 1"),
        (RankSchedule, dict(beta2=1.0), "beta2 must be in"),
        (RankSchedule, dict(tinit=1.5), r"tinit as a fraction of the run must be in \[0, 1\)"),
        (RankSchedule, dict(tfinal=True), "tfinal must be an int"),
        (RankSchedule, dict(tinit=0.5, tfinal=0.5, total_step=10), r"tinit \(5\) \+ tfinal \(5\) must be less"),
        (AdaLoRASettings, dict(init_r=0, target_r=0), "init_r must be >= 1"),
        (AdaLoRASettings, dict(init_r=4, target_r=6), r"target_r \(6\) cannot exceed init_r \(4\)"),
        (AdaLoRASettings, dict(target_r=-1), "target_r must be >= 0"),
        (AdaLoRASettings, dict(orth_reg_weight=-0.1), "orth_reg_weight must be >= 0"),
        (SensitivityLoRASettings, dict(estimator="magic"), "Unknown sensitivity estimator 'magic'"),
        (SensitivityLoRASettings, dict(r_avg=1, r_min=2), "below r_min"),
        (SensitivityLoRASettings, dict(r_avg=8, r_max=4), "r_max=4 is below the average rank"),
        (SensitivityLoRASettings, dict(num_probes=0), "num_probes must be >= 1"),
        (SensitivityLoRASettings, dict(effrank_alpha=1.5), "must lie in \\(0, 1\\]"),
        (HypernetSettings, dict(mode="frozen"), "Unknown hypernet mode 'frozen'"),
        (HypernetSettings, dict(hidden=30, heads=4), r"hypernet_hidden \(30\) must be a positive multiple"),
        (HypernetSettings, dict(lr=0.0), "hypernet_lr must be > 0"),
        (HypernetSettings, dict(warmup=-2), "hypernet_warmup must be >= 0"),
    ],
)
def test_bad_settings_are_one_clear_error(cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kwargs)


def test_lora_patterns_match_suffix_or_regex_and_yaml_null_is_empty():
    settings = LoRASettings(rank=8, alpha=16.0, rank_pattern={"query": 2, r".*\.1\..*value": 5},
                            alpha_pattern=None)
    assert settings.alpha_pattern == {}
    assert settings.rank_for("bert.encoder.layer.0.attention.self.query") == 2
    assert settings.rank_for("bert.encoder.layer.1.attention.self.value") == 5
    assert settings.rank_for("bert.encoder.layer.0.attention.self.value") == 8
    assert settings.alpha_for("anything") == 16.0


def test_schedule_resolves_fractions_against_the_run_once():
    settings = AdaLoRASettings(init_r=6, target_r=2, tinit=0.1, tfinal=0.25, delta_t=3)
    run = settings.resolved(200)
    assert (run.tinit, run.tfinal, run.total_step) == (20, 50, 200)
    assert run.resolved(999) == run  # an explicit (or already resolved) total_step wins over the estimate
    assert AdaLoRASettings(tinit=4, total_step=50).resolved(10).total_step == 50
    with pytest.raises(ValueError, match="no step limit"):
        settings.resolved(float("inf"))
    with pytest.raises(ValueError, match="does not fit the run"):
        AdaLoRASettings(tinit=5, tfinal=0.5).resolved(10)
    with pytest.raises(ValueError, match="leave no steps to prune in"):
        AdaLoRASettings(tinit=0.5, tfinal=0.5)


def test_peft_schedule_carries_the_settings_unchanged():
    run = AdaLoRASettings(init_r=6, target_r=3, tinit=0.1, tfinal=0.2, delta_t=5, beta1=0.8, beta2=0.7,
                          orth_reg_weight=0.1).resolved(100)
    assert run.peft_schedule() == {"target_r": 3, "tinit": 10, "tfinal": 20, "deltaT": 5, "beta1": 0.8,
                                   "beta2": 0.7, "orth_reg_weight": 0.1, "total_step": 100}
    # a module never fit has no run length: the shortest run PEFT accepts (tinit < total_step - tfinal)
    never_fit = AdaLoRASettings(tinit=3, tfinal=0.5).peft_schedule()
    assert (never_fit["tinit"], never_fit["tfinal"], never_fit["total_step"]) == (3, 4, 8)
    assert AdaLoRASettings().peft_schedule()["total_step"] == 1


def test_settings_round_trip_through_a_dict():
    run = AdaLoRASettings(init_r=4, target_r=2, tinit=0.1).resolved(50)
    assert AdaLoRASettings(**asdict(run)) == run


def test_sensitivity_ranks_before_allocation_are_the_rounded_average():
    settings = SensitivityLoRASettings(r_avg=2.6, r_min=1, alpha=8.0, alpha_pattern={"query": 4.0})
    assert settings.rank_for("any.layer") == 3
    assert settings.alpha_for("layer.0.query") == 4.0 and settings.alpha_for("layer.0.key") == 8.0


def test_the_public_api_is_importable_from_the_package_without_loading_it_up_front():
    import subprocess
    import sys

    code = ("import sys, lora_lightning as ll; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; "
            "names = ll.__all__; assert {'LoRAModule', 'AdaLoRASettings', 'export_peft'} <= set(names); "
            "assert all(getattr(ll, n) is not None for n in names); from lora_lightning import HyperAdaLoRAModule")
    subprocess.run([sys.executable, "-c", code], check=True)
    import lora_lightning

    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        lora_lightning.nothing  # noqa: B018
