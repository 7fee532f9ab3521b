"""Every documented extension point, used by a subclass in research_plugins.py and chosen through the CLI by
class_path, as a research user would (docs/extending.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_lightning.cli import run_cli

pytestmark = pytest.mark.integration
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def fit(tmp_path, backbone: str, model: dict, callbacks: list | None = None, max_steps: int = 6):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 1,
                    "val_check_interval": min(max_steps, 4), "default_root_dir": str(tmp_path),
                    "callbacks": callbacks or []},
        "model": {"class_path": model.pop("class_path"),
                  "init_args": {"backbone": backbone, "target_modules": ["query", "value"], **model}},
        "data": {"class_path": "lora_lightning.data.TextClassificationDataModule",
                 "init_args": {"source": "rotten_tomatoes", "max_train_samples": 16, "max_eval_samples": 8,
                               "max_length": 32, "batch_size": 4}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cli(["fit", "--config", str(path)])


def test_importance_budget_and_task_through_the_cli(tiny_bert, tmp_path):
    """AdaLoRA with a magnitude importance score, a linear budget and a label-smoothed task with a Brier metric."""
    import research_plugins as rp

    cli = fit(tmp_path, tiny_bert, {"class_path": "research_plugins.SmoothedAdaLoRA", "smoothing": 0.2,
                                    "init_r": 4, "target_r": 1},
              callbacks=[{"class_path": "research_plugins.LinearBudgetPruning",
                          "init_args": {"tinit": 1, "tfinal": 1, "delta_t": 1,
                                        "importance": {"class_path": "research_plugins.MagnitudeImportance"}}}])
    trainer, module = cli.trainer, cli.model
    pruners = [cb for cb in trainer.callbacks if isinstance(cb, rp.LinearBudgetPruning)]
    assert len(pruners) == 1, "the module installed its own scheduler next to the configured one"
    pruner = pruners[0]
    # importance: ours was called on every step before the final phase (steps 1..4 of 6 with tfinal=1)
    assert isinstance(pruner.importance, rp.MagnitudeImportance) and pruner.importance.updates == 4
    # budget: 16 triplets (4 matrices x r=4) down to 4, linearly over steps 2..4, then the target at step 5
    assert isinstance(pruner.schedule, rp.LinearBudget)
    assert pruner.events == [(2, 13), (3, 10), (4, 7), (5, 4)]
    units = module.rank_units()
    assert sum(int(u.mask.sum()) for u in units.values()) == 4
    # the final masks are the top-4 |Λ| at the finalising step: every kept |Λ| >= every pruned one would hold
    # then; Λ kept after it keeps training, so only check each kept triplet has non-zero magnitude
    assert all(float(u.lam.detach()[u.mask.bool()].abs().min()) > 0 for u in units.values() if u.mask.any())
    # task: our loss and metrics
    assert isinstance(module.task, rp.SmoothedBinaryClassification) and module.task.smoothing == 0.2
    assert {"val/accuracy", "val/brier"} <= set(trainer.callback_metrics)


def test_sensitivity_estimator_named_by_import_path(tiny_bert, tmp_path):
    import research_plugins as rp

    before = rp.LayerDepthEstimator.calls
    cli = fit(tmp_path, tiny_bert, {"class_path": "lora_lightning.modules.SensitivityLoRAModule", "r_avg": 2,
                                    "r_min": 1, "num_batches": 1, "estimator": "research_plugins.LayerDepthEstimator"},
              max_steps=2)
    assert rp.LayerDepthEstimator.calls == before + 1
    allocation = cli.model.allocation
    layer0 = [r for n, r in allocation.items() if "layer.0." in n]
    layer1 = [r for n, r in allocation.items() if "layer.1." in n]
    assert min(layer0) > max(layer1), allocation  # the toy estimator calls layer 0 the more sensitive


def test_unknown_estimator_path_is_a_clear_error(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="Unknown sensitivity estimator 'research_plugins.Nope'"):
        fit(tmp_path, tiny_bert, {"class_path": "lora_lightning.modules.SensitivityLoRAModule",
                                  "estimator": "research_plugins.Nope"})


def test_custom_hyperadalora_generator_trains(tiny_bert, tmp_path):
    import research_plugins as rp

    cli = fit(tmp_path, tiny_bert, {"class_path": "research_plugins.GatedHyperAdaLoRA", "init_r": 4, "target_r": 2,
                                    "tinit": 1, "tfinal": 1, "hypernet_warmup": 0, "learning_rate": 0.01},
              max_steps=4)
    generators = cli.model.hypernet.generators
    assert generators and all(isinstance(g, rp.GatedLinearGenerator) for g in generators.values())
    # the generators were in the optimiser and learnt something (their gate leaves 0)
    assert all(float(g.gate.abs()) > 0 for g in generators.values())
    hypernet_params = {id(p) for p in cli.model.hypernet.parameters()}
    optimised = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert hypernet_params <= optimised
    assert any(k.startswith("hypernet.generators.") and ".maps." in k for k in cli.model.adapter_state_keys())
