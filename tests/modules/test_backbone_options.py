"""Backbone options of every method: backbone_dtype, gradient_checkpointing, quantization, attn_implementation,
and their bad input (docs/large_models.md)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertForSequenceClassification

from lora_lightning.adapters.base import adapter_layers
from lora_lightning.export import export_merged, export_peft
from lora_lightning.modules import AdaLoRAModule, LoRAModule
from lora_lightning.modules.hyperadalora import HyperAdaLoRAModule
from lora_lightning.modules.sensitivity_lora import SensitivityLoRAModule
from tests.helpers import batch_loader, quiet_trainer, random_batch

HYPER = dict(hypernet_hidden=16, hypernet_heads=2)
METHODS = {
    "lora": (LoRAModule, dict(rank=4)),
    "adalora": (AdaLoRAModule, dict(init_r=4, target_r=2, total_step=10)),
    "hyperadalora": (HyperAdaLoRAModule, dict(init_r=4, target_r=2, total_step=10, **HYPER)),
}
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="pip install bitsandbytes")


def build(method: str, backbone: str, seed: int = 0, **options):
    cls, kwargs = METHODS[method]
    task = "causal-lm" if "llama" in backbone else "sequence-classification"
    torch.manual_seed(seed)
    module = cls(backbone=backbone, task=task, **kwargs, **options)
    with torch.no_grad():  # non-zero adapters, so every factor gets a gradient
        for adapter in adapter_layers(module.backbone).values():
            for p in adapter.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return module


def batch_for(backbone: str, seed: int = 0) -> dict:
    batch = random_batch(vocab_size=30522 if "bert" in backbone else 49152, seed=seed)
    if "llama" in backbone:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def checkpointing_on(model) -> bool:
    """transformers 5 renamed ``is_gradient_checkpointing`` (the old name warns)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def training_loss(module, batch):
    module.train()
    loss = module(batch).loss
    return loss + sum(module.extra_losses().values())


def trained_grads(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad and p.grad is not None}


def importance_inputs(module) -> dict[str, torch.Tensor]:
    """The gradients AdaLoRA's importance is computed from: of P, Λ, Q (leaves, or the generated tensors)."""
    if not hasattr(module, "rank_units"):
        return {}
    return {f"{name}.{i}": t.grad.clone() for name, unit in module.rank_units().items()
            for i, t in enumerate((unit.P, unit.lam, unit.Q)) if t.grad is not None}


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (dict(backbone_dtype="float64"), ValueError, "Unknown backbone_dtype 'float64'"),
        (dict(backbone_dtype="float16"), ValueError, "on CPU use backbone_dtype: bfloat16"),
        (dict(attn_implementation="flash_attention_2"), ValueError, "use sdpa (or eager) on CPU"),
        (dict(attn_implementation="xformers"), ValueError, "Unknown attn_implementation"),
        (dict(quantization="nf3"), ValueError, "choose one of ['none', 'nf4', 'int8']"),
    ],
)
def test_bad_option_fails_before_loading(options, error, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # A backbone path that does not exist: the option error must come first, before anything is loaded.
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        LoRAModule(backbone="/nonexistent/backbone", **options)


def test_quantization_without_bitsandbytes_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'lora-lightning\[quant\]'"):
        LoRAModule(backbone="/nonexistent/backbone", quantization="nf4")


def test_checkpointing_on_an_unsupporting_backbone_names_its_class(tiny_bert, monkeypatch):
    monkeypatch.setattr(BertForSequenceClassification, "supports_gradient_checkpointing", False)
    with pytest.raises(ValueError, match="backbone class BertForSequenceClassification does not support"):
        LoRAModule(backbone=tiny_bert, gradient_checkpointing=True)


# --------------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_base_keeps_adapters_hypernet_head_and_optimiser_state_fp32(tiny_bert, method):
    full, half = build(method, tiny_bert), build(method, tiny_bert, backbone_dtype="bfloat16")
    assert half.backbone.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
    trained = [p for p in half.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # adapters, hypernet, classifier
    half.eval(), full.eval()
    batch = batch_for(tiny_bert)
    logits_half, logits_full = half(batch).logits, full(batch).logits
    assert logits_half.dtype == torch.float32  # the fp32 head takes the bf16 hidden state
    torch.testing.assert_close(logits_half, logits_full, atol=3e-2, rtol=3e-2)  # bf16 rounding of the base
    training_loss(half, batch).backward()
    optimizer = torch.optim.AdamW([g for g in half.param_groups() if g["params"]], lr=1e-3)
    optimizer.step()
    assert all(state["exp_avg"].dtype == torch.float32 for state in optimizer.state.values())


def test_bfloat16_backbone_options_survive_checkpoint_reload(tiny_llama, tmp_path):
    module = build("lora", tiny_llama, backbone_dtype="bfloat16", gradient_checkpointing=True,
                   attn_implementation="eager")
    batches = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
               for b in batch_loader(2)]
    for b in batches:
        b["input_ids"] = b["input_ids"] % 49152
        b["labels"] = b["labels"].clamp(max=49151)
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    reloaded = LoRAModule.load_from_checkpoint(tmp_path / "model.ckpt")
    assert (reloaded.hparams.backbone_dtype, reloaded.hparams.gradient_checkpointing,
            reloaded.hparams.attn_implementation) == ("bfloat16", True, "eager")
    assert reloaded.backbone.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert checkpointing_on(reloaded.backbone)
    assert reloaded.backbone.config._attn_implementation == "eager"
    for key, value in module.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(reloaded.state_dict()[key], value, atol=0, rtol=0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lightning_bf16_precisions_train_over_a_bf16_base(tiny_bert, precision):
    module = build("lora", tiny_bert, backbone_dtype="bfloat16")
    before = {k: v.clone() for k, v in module.state_dict().items() if "lora_A" in k}
    quiet_trainer(max_steps=2, precision=precision).fit(module, batch_loader(2))
    after = {k: v for k, v in module.state_dict().items() if "lora_A" in k}
    assert all(not torch.equal(before[k].to(after[k].dtype), after[k]) for k in before)  # trained
    # bf16-mixed keeps the fp32 adapters (autocast computes in bf16); bf16-true casts the whole module, adapters too.
    expected = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    assert {v.dtype for v in after.values()} == {expected}


# --------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("backbone", ["tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_gradients(method, backbone, request):
    path = request.getfixturevalue(backbone)
    plain, checkpointed = build(method, path), build(method, path, gradient_checkpointing=True)
    assert checkpointing_on(checkpointed.backbone) and not checkpointing_on(plain.backbone)
    first_adapter = next(iter(checkpointed.adapters.values()))
    calls = []
    first_adapter.register_forward_pre_hook(lambda *_: calls.append(1))
    for seed in (0, 1):  # two micro-batches of one step: gradients (and generated-tensor gradients) accumulate
        batch = batch_for(path, seed)
        training_loss(plain, batch).backward()
        training_loss(checkpointed, batch).backward()
    assert len(calls) == 4  # each block runs twice per micro-batch: forward, and recomputation in backward
    expected, actual = trained_grads(plain), trained_grads(checkpointed)
    assert expected.keys() == actual.keys() and len(expected) > 0
    if method == "hyperadalora":
        assert any(name.startswith("hypernet.") for name in actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    expected, actual = importance_inputs(plain), importance_inputs(checkpointed)
    assert expected.keys() == actual.keys() and (len(expected) > 0) == (method != "lora")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------- quantisation
QUANT_TOLERANCE = {"int8": 0.05, "nf4": 0.25}  # relative L2 error of the logits vs the fp32 base (measured below)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@needs_bnb
@pytest.mark.parametrize("quantization", ["nf4", "int8"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantised_base_matches_fp32_and_adapter_grads_flow(tiny_llama, method, quantization):
    full, quant = build(method, tiny_llama), build(method, tiny_llama, quantization=quantization)
    layer = quant.backbone.model.layers[0].self_attn.q_proj.base_layer
    assert not layer.weight.dtype.is_floating_point  # stored quantised
    assert quant.backbone.lm_head.weight.dtype == torch.float32  # the output layer is not quantised
    batch = batch_for(tiny_llama)
    full.eval(), quant.eval()
    with torch.no_grad():
        assert relative_error(quant(batch).logits, full(batch).logits) < QUANT_TOLERANCE[quantization]
    training_loss(quant, batch).backward()
    grads = trained_grads(quant)
    assert len(grads) == sum(p.requires_grad for p in quant.parameters())
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Every adapter factor moves; the hypernet's zero output projections pass no gradient further back at step 0.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if not name.startswith("hypernet."))
    out_projections = [name for name in grads if name.startswith("hypernet.") and ".block." not in name
                       and ".out_proj." in name]
    assert (len(out_projections) > 0) == (method == "hyperadalora")
    assert all(grads[name].abs().sum() > 0 for name in out_projections)


@needs_bnb
def test_quantised_classifier_head_stays_full_precision(tiny_bert):
    module = build("lora", tiny_bert, quantization="nf4")
    assert module.backbone.classifier.weight.dtype == torch.float32
    assert module.backbone.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.uint8


@needs_bnb
def test_nf4_base_trains_the_same_after_a_validation_pass(tiny_llama):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for inference at its first eval no-grad forward,
    after which no gradient flows through the base (or, at hidden 32, the forward fails): a validation pass must
    leave the next step's gradients unchanged."""
    quant = build("lora", tiny_llama, quantization="nf4")
    layers = [m for m in quant.backbone.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 14 and not any(m.support_avx512bf16_for_cpu for m in layers)  # 7 projections x 2 blocks
    batch = batch_for(tiny_llama)
    training_loss(quant, batch).backward()
    before = trained_grads(quant)
    quant.zero_grad(set_to_none=True)
    quant.eval()
    with torch.no_grad():
        quant(batch)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    training_loss(quant, batch).backward()
    after = trained_grads(quant)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=0, rtol=0, msg=name)


@needs_bnb
def test_quantised_base_refuses_merge_and_exports_peft_for_the_fp32_base(tiny_llama, tmp_path, monkeypatch):
    quant = build("lora", tiny_llama, quantization="nf4")
    with monkeypatch.context() as patch:  # refused before the backbone is copied
        patch.setattr("copy.deepcopy", lambda *a, **k: pytest.fail("copied the backbone before refusing"))
        with pytest.raises(ValueError, match="Cannot merge an adapter into the quantised base layer .*q_proj"):
            export_merged(quant, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    export_peft(quant, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "peft").eval()
    full = build("lora", tiny_llama).eval()  # the same adapter weights (seeded) on the fp32 base
    batch = {k: v for k, v in batch_for(tiny_llama).items() if k != "labels"}
    with torch.no_grad():
        exported = peft_model(**batch).logits
        torch.testing.assert_close(exported, full(batch).logits, atol=1e-5, rtol=1e-5)
        assert relative_error(exported, quant.eval()(batch).logits) < QUANT_TOLERANCE["nf4"]


def test_attn_implementation_reaches_transformers(tiny_bert):
    module = LoRAModule(backbone=tiny_bert, attn_implementation="eager")
    assert module.backbone.config._attn_implementation == "eager"
    assert AutoModelForSequenceClassification.from_pretrained(tiny_bert).config._attn_implementation == "sdpa"


@needs_bnb
def test_quantising_a_gguf_backbone_is_refused_before_loading(monkeypatch):
    import lora_lightning.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "resolve_backbone",
                        lambda name: ("/nonexistent/gguf", {"gguf_file": "m.gguf"}))
    monkeypatch.setattr(backbone_module.os.path, "exists", lambda path: True)
    with pytest.raises(ValueError, match="is a GGUF file, which transformers dequantises itself"):
        LoRAModule(backbone="packaged-gguf", task="causal-lm", quantization="nf4")


@needs_bnb
def test_sensitivity_lora_allocates_and_trains_over_a_bf16_checkpointed_nf4_base(tiny_bert):
    with pytest.raises(ValueError, match="use estimator: activation"):
        SensitivityLoRAModule(backbone="/nonexistent/backbone", estimator="fisher", quantization="nf4")
    torch.manual_seed(0)
    module = SensitivityLoRAModule(backbone=tiny_bert, r_avg=2, r_max=4, num_batches=2,
                                   target_modules=["query", "dense"],
                                   backbone_dtype="bfloat16", gradient_checkpointing=True, quantization="nf4")
    quiet_trainer(max_steps=2).fit(module, batch_loader(3))
    assert sum(module.allocation.values()) == 2 * len(module.allocation)
    assert all(layer.lora_B.abs().sum() > 0 for layer in module.adapters.values())  # trained from B = 0


@needs_bnb
def test_activation_sensitivity_weights_a_quantised_layer_by_its_output_features(tiny_bert):
    """``weight_by_dout`` multiplies each layer's statistic by d_out, read from the layer, not from its packed
    4-bit weight (whose shape is (d_out·d_in/2, 1))."""
    from lora_lightning.allocation.sensitivity import build_estimator

    module = LoRAModule(backbone=tiny_bert, rank=2, target_modules=["query", "dense"], quantization="nf4")
    layers = {name: adapter.base_layer for name, adapter in adapter_layers(module.backbone).items()}
    batches = [random_batch(seed=i) for i in range(2)]
    plain, weighted = (build_estimator("activation")(module.backbone, layers, batches, None, weight_by_dout=flag)
                       for flag in (False, True))
    assert {layer.out_features for layer in layers.values()} == {32, 64}  # attention / intermediate / output
    for name, layer in layers.items():
        assert layer.weight.shape[1] == 1  # packed
        torch.testing.assert_close(weighted.diagonals()[name], layer.out_features * plain.diagonals()[name])
