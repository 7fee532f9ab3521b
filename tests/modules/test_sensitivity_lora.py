"""SensitivityLoRAModule: bad input before any work, allocation applied to the layers, checkpoint round trip
(shapes from the checkpoint), and export to PEFT LoRA with rank_pattern giving equal logits."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from tests.helpers import random_batch
from lora_lightning.export import export_peft
from lora_lightning.modules import SensitivityLoRAModule

MISSING = "/definitely/not/a/backbone"  # loading it would fail: errors below must come first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"estimator": "magic"}, "Unknown sensitivity estimator 'magic'"),
        ({"r_avg": 1, "r_min": 2}, "below r_min"),
        ({"r_avg": 8, "r_max": 4}, "r_max=4 is below the average rank"),
        ({"r_min": 0}, "r_min must be >= 1"),
        ({"num_batches": 0}, "num_batches must be >= 1"),
        ({"alpha": 0}, "alpha must be > 0"),
        ({"topk_ratio": 0}, "topk_ratio and effrank_alpha must lie in"),
    ],
)
def test_bad_input_fails_before_loading_the_backbone(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SensitivityLoRAModule(backbone=MISSING, **kwargs)


@pytest.mark.parametrize("fixed", [{"rank": 8}, {"rank_pattern": {"query": 2}}])
def test_ranks_are_not_arguments(fixed):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(fixed))}'"):
        SensitivityLoRAModule(backbone=MISSING, **fixed)


def test_settings_hold_the_arguments_and_hparams_hold_no_rank(tiny_bert):
    module = SensitivityLoRAModule(backbone=tiny_bert, r_avg=3, r_max=5, alpha=8.0, alpha_pattern={"query": 4.0})
    assert (module.settings.r_avg, module.settings.r_max, module.settings.alpha) == (3, 5, 8.0)
    assert "rank" not in module.hparams and "rank_pattern" not in module.hparams
    alphas = {name: layer.alpha for name, layer in module.lora_layers().items()}
    assert {alphas[n] for n in alphas if n.endswith("query")} == {4.0}
    assert {alphas[n] for n in alphas if not n.endswith("query")} == {8.0}
    assert set(module.kept_ranks().values()) == {3}  # the average until the allocation


def allocated(tiny_bert, **kwargs):
    torch.manual_seed(0)
    module = SensitivityLoRAModule(backbone=tiny_bert, r_avg=3, target_modules=["query", "dense"], **kwargs)
    names = list(module.lora_layers())
    ranks = {name: 1 + i % 5 for i, name in enumerate(names)}
    module.apply_allocation(ranks, {"estimator": "test"})
    for layer in module.lora_layers().values():  # a trained-looking update
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    return module, ranks


def test_apply_allocation_reshapes_layers(tiny_bert):
    module, ranks = allocated(tiny_bert)
    assert {n: layer.rank for n, layer in module.lora_layers().items()} == ranks
    assert module.kept_ranks() == ranks
    assert all(layer.lora_A.requires_grad and layer.lora_B.requires_grad for layer in module.lora_layers().values())
    assert module.allocation_report["trainable_lora_parameters"] == sum(
        ranks[n] * (layer.in_features + layer.out_features) for n, layer in module.lora_layers().items()
    )
    with pytest.raises(ValueError, match="does not fit this model"):
        module.apply_allocation({"nope": 2})


def test_checkpoint_round_trip_restores_shapes(tiny_bert, tmp_path):
    module, ranks = allocated(tiny_bert)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "sens.ckpt"
    trainer.save_checkpoint(path)
    loaded = SensitivityLoRAModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.allocation == ranks and loaded.allocation_report["estimator"] == "test"
    batch = random_batch()
    module.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, module(batch).logits)


def test_export_to_peft_with_rank_pattern_gives_equal_logits(tiny_bert, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    module, ranks = allocated(tiny_bert)
    folder = export_peft(module, tmp_path / "peft", "lora")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    reference = peft.PeftModel.from_pretrained(base, folder).eval()
    for name, rank in ranks.items():
        assert reference.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.shape[0] == rank
    batch = random_batch()
    module.eval()
    with torch.no_grad():
        ours = module({k: v for k, v in batch.items() if k != "labels"}).logits
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_fit_with_the_automatic_estimator_then_export(tiny_bert, tmp_path):
    """End to end on the tiny backbone: configure_callbacks installs the estimator, ranks follow the budget."""
    torch.manual_seed(0)
    module = SensitivityLoRAModule(backbone=tiny_bert, r_avg=2, r_max=4, num_batches=2,
                                   target_modules=["query", "dense"])
    data = DataLoader([random_batch(seed=i) for i in range(3)], batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    assert sum(module.allocation.values()) == 2 * len(module.allocation)
    assert max(module.allocation.values()) <= 4
    folder = export_peft(module, tmp_path / "fitted", "lora")
    assert (folder / "adapter_config.json").exists()
