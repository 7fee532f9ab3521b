"""benchmarks/tensor_memory.py: the counter's bytes on a hand-checked computation, and a training step counted on
the meta device (no data, no compute) equal to the same step counted on real tensors, for our LoRA and PEFT's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_accounting  # noqa: E402
from random_llama import save_random_backbone  # noqa: E402
from tensor_memory import PeakTensorMemory, meta_device  # noqa: E402


def test_counts_each_storage_once_and_releases_it_when_freed():
    x = torch.zeros(1000)  # 4000 bytes, alive before counting
    counter = PeakTensorMemory([x, x.view(10, 100)])  # a view shares x's storage
    assert counter.current == 4000
    with counter:
        y = x * 2          # +4000
        z = y + 1          # +4000: 12000 alive
        y.add_(1)          # in place: nothing new
        w = z[:10]         # a view of z: nothing new
        del y              # -4000
        v = torch.ones(250, dtype=torch.float64)  # +2000
    assert counter.peak == 12000
    assert counter.current == 10000
    assert w.shape == (10,) and v.sum() == 250


@pytest.mark.parametrize("side,setup", [("ours", "fp32"), ("peft", "fp32"), ("ours", "bf16 + ckpt"),
                                        ("peft", "bf16 + ckpt"), ("ours", memory_accounting.CHUNKED.name)])
def test_a_step_counted_on_meta_equals_the_real_step(tmp_path, side, setup):
    pytest.importorskip("peft")
    dtype = torch.bfloat16 if setup.startswith("bf16") else torch.float32
    folder = save_random_backbone("tiny", tmp_path / "tiny", dtype)
    real = memory_accounting.count_step(folder, side, setup, batch=2, block=32, meta=False)
    meta = memory_accounting.count_step(folder, side, setup, batch=2, block=32, meta=True)
    assert meta["peak_bytes"] == real["peak_bytes"]
    assert meta["at_rest_bytes"] == real["at_rest_bytes"] and meta["after_step_bytes"] == real["after_step_bytes"]
    # the peak holds more than the weights: the step's activations and the logits of 64 tokens x 49,152 words
    assert real["peak_bytes"] - real["at_rest_bytes"] > 64 * 49152 * 4


def test_on_a_bf16_base_our_adapters_hold_less_than_peft(tmp_path):
    """PEFT's fp32 adapters save an fp32 copy of each adapted layer's bf16 input for the backward; ours keep the bf16
    input (adapters.base.low_rank_output): at least one fp32 copy of the residual stream per block less."""
    pytest.importorskip("peft")
    folder = save_random_backbone("tiny", tmp_path / "tiny", torch.bfloat16)
    ours, peft = (memory_accounting.count_step(folder, side, "bf16", batch=2, block=128, meta=False)["peak_bytes"]
                  for side in ("ours", "peft"))
    hidden, layers = 64, 2  # random_llama.SHAPES["tiny"]
    assert peft - ours >= 2 * 128 * hidden * 4 * layers


def test_the_meta_build_refuses_a_quantised_base(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = memory_accounting.config_folder("tiny", tmp_path)
    with meta_device(), pytest.raises(ValueError, match="count it on real tensors"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=object())


def test_the_memory_model_recovers_known_terms_and_checks_them_on_unseen_models():
    coef = [2.0, 3.0, 1.5, 12.0, 5e8]  # bytes per term; constant bytes
    rows = [{"model": model, "tokens": tokens, "setup": "bf16", "side": "ours",
             "params": memory_accounting.model_config(model).num_hidden_layers * 1e8}
            for model in ("135M", "0.5B", "1.5B", "Llama-3.1-8B") for tokens in ("2x512", "2x2048", "4x2048")]
    for row in rows:
        row["peak_bytes"] = sum(c * t for c, t in zip(coef, memory_accounting.model_terms(row)))
    rows[-1]["peak_bytes"] *= 1.1  # one paper-scale row 10 % off what the small models predict
    ((setup, a, b, c, d, e, fitted_error, held_out_error),) = memory_accounting.memory_model(rows)
    assert (setup, a, b, c, d, e) == ("bf16", "2.00", "3.0", "1.5", "12.0", f"{5e8 / 2**20:.0f}")
    assert fitted_error == "0.0 %" and held_out_error == "9.1 %"  # 1 / 1.1 - 1
