import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from lora_lightning.cli import main as cli_main
from lora_lightning.export import export_merged, export_peft
from lora_lightning.modules import LoRAModule
from tests.helpers import random_batch
from tests.modules.test_lora_module import perturb_adapters


def trained(backbone: str, **kwargs) -> LoRAModule:
    module = LoRAModule(backbone=backbone, **kwargs).eval()
    perturb_adapters(module)
    return module


def test_peft_lora_export_loads_with_equal_logits(tiny_bert, tmp_path):
    module = trained(tiny_bert, rank=4, rank_pattern={"value": 2}, alpha_pattern={"key": 3.0}, label_names=["neg", "pos"])
    export_peft(module, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"]["bert.encoder.layer.0.attention.self.value"] == 2
    assert config["modules_to_save"] == ["classifier"]
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), tmp_path / "peft")
    batch = random_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        difference = (reloaded.eval()(**inputs).logits - module(inputs).logits).abs().max()
    assert difference <= 1e-5


def test_merged_export_equals_adapted_model(tiny_llama, tmp_path):
    module = trained(tiny_llama, task="causal-lm", target_modules=["q_proj", "v_proj", "down_proj"], rank=2)
    export_merged(module, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 500, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module({"input_ids": ids}).logits, atol=1e-5, rtol=1e-4)


def test_conv1d_backbone_exports_to_peft(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    module = trained(str(tmp_path / "gpt2"), task="causal-lm", target_modules=["c_attn", "c_proj"], rank=2)
    export_peft(module, tmp_path / "peft")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - module({"input_ids": ids}).logits).abs().max() <= 1e-5


def test_export_never_overwrites_without_consent_and_failures_leave_previous(tiny_bert, tmp_path, monkeypatch):
    module = trained(tiny_bert, rank=2)
    target = export_peft(module, tmp_path / "peft")
    before = (target / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        export_peft(module, target)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("lora_lightning.export.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_peft(module, target, overwrite=True)
    assert (target / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no staging folder left behind


def test_cli_export_from_checkpoint(tiny_bert, tmp_path):
    import lightning as L

    module = trained(tiny_bert, rank=2)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    cli_main(["export", "--checkpoint", str(tmp_path / "a.ckpt"), "--output", str(tmp_path / "out")])
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), tmp_path / "out")
    inputs = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        assert (reloaded.eval()(**inputs).logits - module(inputs).logits).abs().max() <= 1e-5
    (tmp_path / "bad.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        cli_main(["export", "--checkpoint", str(tmp_path / "bad.ckpt"), "--output", str(tmp_path / "out2")])
