"""loss_chunk_tokens: the causal-LM loss over token chunks equals transformers' loss (value, gradients, second order,
``num_items_in_batch``), holds fewer bytes at its peak, trains under FSDP2, and is refused where it cannot apply
before any weight is read."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from lora_lightning.chunked_loss import chunked_causal_lm_loss, chunked_loss
from lora_lightning.modules import LoRAModule, SensitivityLoRAModule
from tests.helpers import one_process_group, quiet_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tensor_memory import PeakTensorMemory  # noqa: E402

TARGETS = ["q_proj", "v_proj"]


def lm_batch(vocab_size: int, seed: int = 0, batch_size: int = 2, seq_len: int = 19) -> dict[str, torch.Tensor]:
    """Random tokens; the first tokens of one row and the padded tail of another are not targets (-100)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :6] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_causal_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=301, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    config._attn_implementation = "eager"  # twice differentiable (the CPU fused attention's backward is not)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("chunk", [1, 7, 38, 1000])  # one token, a chunk that does not divide 38 tokens, all, more
def test_loss_gradient_and_hessian_vector_product_equal_transformers(chunk):
    model, batch = tiny_causal_lm(), lm_batch(301)
    weight = model.model.layers[0].self_attn.q_proj.weight
    probe = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))

    def derivatives(chunk_tokens: int):
        if chunk_tokens:
            with chunked_loss(model, chunk_tokens):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        grad, = torch.autograd.grad(loss, weight, create_graph=True)
        hvp, = torch.autograd.grad((grad * probe).sum(), weight)  # what Sensitivity-LoRA's Hessian probes take
        return loss.detach(), grad.detach(), hvp

    reference, chunked = derivatives(0), derivatives(chunk)
    assert reference[1].abs().max() > 0 and reference[2].abs().max() > 0
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], reference[1], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(chunked[2], reference[2], rtol=1e-5, atol=1e-8)
    # the backbone is as it was: its output layer returns logits again, its loss is transformers' own
    assert model(**batch).logits.shape == (2, 19, 301) and "_loss_function" not in vars(model)


def test_a_sum_over_num_items_in_batch_equals_transformers():
    generator = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 9, 16, generator=generator), torch.nn.Linear(16, 40, bias=False)
    labels = torch.randint(0, 40, (2, 9), generator=generator)
    labels[0, :3] = -100
    expected = ForCausalLMLoss(head(hidden), labels, 40, num_items_in_batch=torch.tensor(25))
    got = chunked_causal_lm_loss(hidden, labels, 40, num_items_in_batch=torch.tensor(25), head=head, chunk_tokens=4)
    torch.testing.assert_close(got, expected)


def step_peak_bytes(module: LoRAModule, batch: dict[str, torch.Tensor]) -> int:
    counter = PeakTensorMemory([*module.parameters(), *module.buffers(), *batch.values()])
    with counter:
        module.task.loss(module(batch), batch).backward()
    return counter.peak


def test_the_module_trains_alike_and_its_step_peak_drops_by_the_logits(tiny_llama):
    """On the tiny Llama (49,152-word vocabulary, hidden 32) the logits dominate the step: in fp32 the plain loss
    holds at least the logits, their log-softmax and a gradient of that size at once; chunked, one chunk of each."""
    batch = lm_batch(49152, seq_len=64)
    modules = {chunk: LoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=TARGETS, rank=2,
                                 loss_chunk_tokens=chunk) for chunk in (0, 16)}
    modules[16].load_state_dict(modules[0].state_dict())
    peaks = {chunk: step_peak_bytes(module, batch) for chunk, module in modules.items()}
    trained = [(name, plain, chunked) for (name, plain), chunked in
               zip(modules[0].named_parameters(), modules[16].parameters()) if plain.requires_grad]
    assert all(plain.grad.abs().max() > 0 for name, plain, _ in trained if "lora_B" in name)  # A's is 0 while B = 0
    for name, plain, chunked in trained:
        torch.testing.assert_close(chunked.grad, plain.grad, rtol=1e-5, atol=1e-7, msg=name)
    tokens, logits_bytes = 2 * 63, 4 * 49152  # targets; bytes of one fp32 logits row
    assert peaks[0] - peaks[16] >= 3 * (tokens - 16) * logits_bytes, peaks
    # validation and prediction: the same loss; prediction has no labels and computes its logits as before
    modules[0].eval(), modules[16].eval()
    with torch.no_grad():
        outputs = [modules[chunk](batch) for chunk in (0, 16)]
        assert outputs[1].logits is None
        torch.testing.assert_close(outputs[1].loss, outputs[0].loss)
        predicted = [modules[chunk].predict_step(batch, 0)["loss"] for chunk in (0, 16)]
    torch.testing.assert_close(predicted[1], predicted[0])


def test_a_sharded_fit_with_chunks_equals_one_without(tiny_llama, tmp_path):
    """Under FSDP2 the output layer is a root parameter, gathered only within the backbone's forward and backward:
    the chunks run there, so a 1-process ModelParallelStrategy fit trains exactly like the plain loss."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    batches = [lm_batch(49152, seed=seed) for seed in range(3)]
    adapters = {}
    for chunk in (0, 8):
        torch.manual_seed(0)
        module = LoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=TARGETS, rank=2, learning_rate=1e-2,
                            loss_chunk_tokens=chunk)
        with one_process_group():
            trainer = quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                                    max_steps=3, default_root_dir=tmp_path / str(chunk))
            trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        adapters[chunk] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                           for k, v in module.state_dict().items()}
    assert adapters[0].keys() == adapters[8].keys() and any("lora_B" in key for key in adapters[0])
    assert any(v.abs().max() > 0 for k, v in adapters[0].items() if "lora_B" in k)  # trained away from B = 0
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[8][key], value, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("estimator", ["fisher", "hutchinson"])
def test_sensitivity_lora_scores_the_same_through_chunks(tiny_llama, tmp_path, estimator):
    """The loss-based estimators differentiate the task loss once (Fisher) or twice (Hutchinson) through the module's
    forward: with chunks, the calibration reports the same sensitivities and the same ranks."""
    batches = [lm_batch(49152, seed=seed) for seed in range(2)]
    reports = []
    for chunk in (0, 8):
        module = SensitivityLoRAModule(backbone=tiny_llama, task="causal-lm", target_modules=TARGETS, r_avg=2,
                                       r_max=4, estimator=estimator, num_batches=2, loss_chunk_tokens=chunk)
        quiet_trainer(max_steps=1, default_root_dir=tmp_path / str(chunk)).fit(
            module, torch.utils.data.DataLoader(batches, batch_size=None))
        reports.append(module.allocation_report)
    assert reports[0]["ranks"] == reports[1]["ranks"]
    plain, chunked = ({name: score["theta"] for name, score in report["scores"].items()} for report in reports)
    assert plain.keys() == chunked.keys() and len(set(plain.values())) > 1
    for name, theta in plain.items():
        assert chunked[name] == pytest.approx(theta, rel=1e-4), name


def test_refused_before_the_weights_are_read(tmp_path, tiny_bert):
    softcapped = tmp_path / "gemma2"  # a config and no weights: a refusal after loading would be an OSError
    Gemma2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32, head_dim=8).save_pretrained(softcapped)
    with pytest.raises(ValueError, match="model type 'gemma2'.*loss_chunk_tokens: 0"):
        LoRAModule(backbone=str(softcapped), task="causal-lm", loss_chunk_tokens=512)
    with pytest.raises(ValueError, match="causal-lm only"):
        LoRAModule(backbone=tiny_bert, task="sequence-classification", loss_chunk_tokens=512)
    with pytest.raises(ValueError, match="int >= 0"):
        SensitivityLoRAModule(backbone=tiny_bert, task="causal-lm", loss_chunk_tokens=-1)
