import json
import os
import stat
from pathlib import Path

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


FRESH_PROCESS_CHECK = r"""
import json, sys
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import pipeline

merged, peft_folder, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
classify = pipeline("text-classification", model=merged, device="cpu")
results = classify(texts)
model = AutoPeftModelForSequenceClassification.from_pretrained(peft_folder).eval()
inputs = classify.tokenizer(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({"pipeline": results, "peft_logits": logits.tolist(), "peft_labels": model.config.id2label}))
"""


def test_exports_run_alone_in_a_fresh_process(tiny_bert, tmp_path):
    """The merged folder runs in ``transformers.pipeline`` with the trained label names and the module's predictions;
    the PEFT folder loads with ``AutoPeftModelForSequenceClassification`` alone and gives the module's logits."""
    import subprocess
    import sys

    from lora_lightning.backbone import load_tokenizer

    module = trained(tiny_bert, rank=2, label_names=["rotten", "fresh"])
    export_merged(module, tmp_path / "merged")
    export_peft(module, tmp_path / "peft")
    texts = ["a gripping, beautifully shot film", "dull and far too long", "the cast does what it can"]
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(tmp_path / "merged"), str(tmp_path / "peft"),
                           json.dumps(texts)], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    inputs = dict(load_tokenizer(tiny_bert)(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        probabilities = module(inputs).logits.softmax(-1)
    expected = [module.label_names[i] for i in probabilities.argmax(-1).tolist()]
    assert [r["label"] for r in result["pipeline"]] == expected
    assert [r["score"] for r in result["pipeline"]] == pytest.approx(probabilities.max(-1).values.tolist(), abs=1e-5)
    assert torch.tensor(result["peft_logits"]) == pytest.approx(module(inputs).logits.detach(), abs=1e-5)
    for folder in ("merged", "peft"):
        names = {p.name for p in (tmp_path / folder).iterdir()}
        assert {"tokenizer.json", "tokenizer_config.json", "label_names.json"} <= names, folder
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "rotten", "1": "fresh"} and "quantization_config" not in config


def test_peft_export_of_the_packaged_minilm_names_its_folder(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    from lora_lightning.backbone import locate_backbone

    module = trained("minilm", rank=2, target_modules=["query", "value"], label_names=["rotten", "fresh"])
    export_peft(module, tmp_path / "peft")
    base = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == locate_backbone("minilm")[0] and (tmp_path / "peft" / base / "config.json").is_file()
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "peft").eval()
    inputs = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        assert (reloaded(**inputs).logits - module(inputs).logits).abs().max() <= 1e-5


def saved_checkpoint(module, path, callbacks_state: dict | None = None):
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    if callbacks_state is not None:
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["callbacks"] = callbacks_state
        torch.save(checkpoint, path)
    return path


def test_export_checks_the_output_folder_before_loading_the_model(tiny_bert, tmp_path, monkeypatch):
    checkpoint = saved_checkpoint(trained(tiny_bert, rank=2), tmp_path / "a.ckpt")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(LoRAModule, "load_from_checkpoint", no_loading)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "taken")])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="a-file is a file"):
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "a-file" / "out")])
    real_access = os.access
    monkeypatch.setattr("lora_lightning.atomic.os.access",
                        lambda path, mode: False if Path(path) == tmp_path / "locked" else real_access(path, mode))
    (tmp_path / "locked").mkdir()
    with pytest.raises(PermissionError, match="locked is not writable"):
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "locked" / "new" / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a.ckpt", "locked", "taken"]
    assert not any((tmp_path / "locked").iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_follow_the_umask(tiny_bert, tmp_path, umask):
    module = trained(tiny_bert, rank=2, label_names=["a", "b"])
    previous = os.umask(umask)
    try:
        export_peft(module, tmp_path / "nested" / "peft")
        export_merged(module, tmp_path / "merged")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "nested", tmp_path / "nested" / "peft", tmp_path / "merged"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    files = [*(tmp_path / "nested" / "peft").iterdir(), *(tmp_path / "merged").iterdir()]
    assert len(files) >= 8
    assert {path.name: stat.S_IMODE(path.stat().st_mode) for path in files} == {path.name: 0o666 & ~umask for path in files}


def test_adalora_export_refuses_an_unfinished_rank_pattern_unless_allowed(tiny_bert, tmp_path, capsys):
    from lora_lightning.callbacks import RankPruningScheduler
    from lora_lightning.export import unfinished_rank_pattern
    from lora_lightning.modules import AdaLoRAModule

    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2).eval()
    pruner = RankPruningScheduler()
    pruner.step, pruner.budget = 4, 40  # mid-run: pruning scheduled, final budget not applied yet
    state = pruner.state_dict()
    checkpoint = saved_checkpoint(module, tmp_path / "mid.ckpt", {"RankPruningScheduler": state})
    with pytest.raises(ValueError, match=r"not final: .* step 4.*--allow-unfinished-ranks"):
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--format", "adalora"])
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="not final"):
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--format", "adalora",
                  "--allow-unfinished-ranks"])
    printed = capsys.readouterr().out
    assert "adapter_config.json, adapter_model.safetensors" in printed and "(adalora)" in printed
    assert unfinished_rank_pattern({"callbacks": {"RankPruningScheduler": {**state, "finalised": True}}}) is None
    assert unfinished_rank_pattern({"callbacks": {"RankPruningScheduler": {**state, "budget": 0}}}) is None  # nothing to prune
    assert unfinished_rank_pattern({}) is None


def write_tiny_gguf_llama(path: Path, vocab: int = 64, hidden: int = 32, layers: int = 2, intermediate: int = 64) -> Path:
    """A 2-layer Llama as an F32 GGUF file (with a toy byte-level vocabulary): the way ``smollm2`` is packaged."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(97 + i % 26) * (1 + i // 26) for i in range(vocab)])
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(1)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for b in range(layers):
        shapes.update({f"blk.{b}.attn_norm.weight": (hidden,), f"blk.{b}.ffn_norm.weight": (hidden,),
                       f"blk.{b}.attn_q.weight": (hidden, hidden), f"blk.{b}.attn_k.weight": (hidden // 2, hidden),
                       f"blk.{b}.attn_v.weight": (hidden // 2, hidden), f"blk.{b}.attn_output.weight": (hidden, hidden),
                       f"blk.{b}.ffn_gate.weight": (intermediate, hidden), f"blk.{b}.ffn_up.weight": (intermediate, hidden),
                       f"blk.{b}.ffn_down.weight": (hidden, intermediate)})
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merged_export_of_a_gguf_loaded_backbone_is_plain_safetensors(tmp_path, monkeypatch):
    """A backbone loaded from GGUF (like the packaged ``smollm2``) keeps transformers' GGUF quantizer, which refuses
    ``save_pretrained``; the merged export saves its dequantised weights without the GGUF reference instead."""
    import lora_lightning.backbone

    gguf_file = write_tiny_gguf_llama(tmp_path / "tiny.gguf")
    monkeypatch.setattr(lora_lightning.backbone, "resolve_backbone",
                        lambda name: (str(tmp_path), {"gguf_file": gguf_file.name}) if name == "tiny-gguf" else (name, {}))
    module = trained("tiny-gguf", task="causal-lm", target_modules=["q_proj", "v_proj"], rank=2)
    assert module.backbone.hf_quantizer is not None  # what made save_pretrained fail
    export_merged(module, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and "gguf" not in json.dumps(config).lower()
    assert not list((tmp_path / "merged").glob("*.gguf"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert module.backbone.hf_quantizer is not None  # the module itself is left as it was
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, module({"input_ids": ids}).logits, atol=1e-5, rtol=1e-4)
