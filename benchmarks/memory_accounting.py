"""Peak tensor memory of one LoRA training step up to 70B, ours vs PEFT, counted on the meta device.

``memory_scaling.py`` measures the host RSS of real steps, which this CPU can run only to 1.5B (and bf16 only at a
few tokens: no bf16 matrix kernels here). This script counts instead, with ``tensor_memory.PeakTensorMemory``, the
bytes of tensor storage alive at the step's peak — weights, adapters, activations saved for the backward, gradients,
AdamW state, temporaries — for the same two contenders (``random_llama.build_ours`` / ``build_peft``: LoRA r=16 on
all linear layers, AdamW, one step of forward + next-token loss + backward + optimiser step), built from a config on
the meta device: no weights, no compute, any size and dtype in seconds. That is the figure a CUDA allocator reports as
``max_memory_allocated``; a GPU needs on top the CUDA context and kernel workspaces (about 0.5–1 GiB) and what its
allocator caches or fragments, which is not counted here and is not measured (no GPU was available).

Models: the random-Llama sizes of ``memory_scaling.py`` (135M, 0.5B, 1.5B) and the papers' and users' models at
their published shapes (``PAPER_MODELS``: Qwen2.5-7B and -32B, Llama-3.1-8B and -70B). ``--validate SIZE:BxT``
first runs the same steps on real tensors (random weights, real compute) and on meta, for both contenders, and
records that the counts agree to the byte (``tests/test_tensor_memory.py`` checks the same on a tiny model).

    python benchmarks/memory_accounting.py --validate 135M:2x512

The setup ``bf16 + ckpt + chunked loss`` (``CHUNKED``: ``loss_chunk_tokens``) is counted for our side only:

    python benchmarks/memory_accounting.py --models Qwen2.5-7B Llama-3.1-8B Qwen2.5-32B Llama-3.1-70B \
        --tokens 2x512 2x2048 4x2048 --setups 'bf16 + ckpt' 'bf16 + ckpt + chunked loss' \
        --name memory_accounting_chunked_loss
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import markdown_table, write_results
from memory_scaling import SETUPS, parse_tokens
from random_llama import (CHUNK_TOKENS, SHAPES, Setup, build_ours, build_peft, llama_config, random_batch,
                          save_random_backbone, training_step)
from tensor_memory import PeakTensorMemory, meta_device

BUILDERS = {"ours": build_ours, "peft": build_peft}
# published shapes: hidden, layers, attention heads, key/value heads, MLP width, vocabulary, query/key/value bias
PAPER_MODELS: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, True),
    "Llama-3.1-8B": (4096, 32, 32, 8, 14336, 128256, False),
    "Qwen2.5-32B": (5120, 64, 40, 8, 27648, 152064, True),
    "Llama-3.1-70B": (8192, 80, 64, 8, 28672, 128256, False),
}
COUNTED_SETUPS = ["fp32", "fp32 + ckpt", "bf16", "bf16 + ckpt"]  # nf4 needs the weights to quantise: not on meta
# ours only (PEFT has no chunked loss): bf16 + ckpt with the loss computed 512 tokens at a time (loss_chunk_tokens)
CHUNKED = Setup("bf16 + ckpt + chunked loss", "bfloat16", True, loss_chunk_tokens=CHUNK_TOKENS)
ALL_SETUPS = {**SETUPS, CHUNKED.name: CHUNKED}
GPUS_GIB = {"24 GB": 24e9 / 2**30, "40 GB": 40e9 / 2**30, "48 GB": 48e9 / 2**30, "80 GB": 80e9 / 2**30,
            "141 GB": 141e9 / 2**30}
HEADROOM = 0.9  # a model "fits" a GPU when its counted peak is at most this share of the GPU's memory


def model_config(name: str):
    """The transformers config of a random-Llama size or a paper model."""
    if name in SHAPES:
        return llama_config(name)
    from transformers import LlamaConfig, Qwen2Config

    hidden, layers, heads, kv_heads, mlp, vocab, qkv_bias = PAPER_MODELS[name]
    shape = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=4096)
    return Qwen2Config(**shape) if qkv_bias else LlamaConfig(**shape)


def config_folder(name: str, cache: Path) -> Path:
    """A folder with the model's ``config.json`` and the SmolLM2 tokenizer, no weights: what the meta build reads."""
    from lora_lightning.backbone import load_tokenizer

    folder = cache / f"{name}-config"
    if not (folder / "config.json").exists():
        model_config(name).save_pretrained(folder)
        load_tokenizer("smollm2").save_pretrained(folder)
    return folder


def count_step(folder: Path, side: str, setup: str, batch: int, block: int, meta: bool) -> dict[str, Any]:
    """Peak and at-rest tensor bytes of one training step of ``side`` on ``folder`` (meta: from its config)."""
    ids = random_batch(batch, block, device="meta" if meta else "cpu")  # labels are input_ids, one storage
    context = meta_device() if meta else torch.device("cpu")
    with context:
        torch.manual_seed(0)
        model = BUILDERS[side](folder, ALL_SETUPS[setup])
        step = training_step(side, model)  # the step memory_scaling.py times: forward, loss, backward, AdamW
        counter = PeakTensorMemory([*model.parameters(), *model.buffers(), *ids.values()])
        at_rest = counter.current
        with counter:
            step(ids)
    result = {"peak_bytes": counter.peak, "at_rest_bytes": at_rest, "after_step_bytes": counter.current,
              "params": sum(p.numel() for p in model.parameters()),
              "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, step, counter
    gc.collect()
    return result


MODEL_TERMS = ("params", "tokens·layers·hidden", "tokens·layers·mlp", "tokens·vocab", "constant")


def model_terms(row: dict[str, Any]) -> list[float]:
    """The memory model's inputs for a counted row: weights scale with the parameters; saved activations with
    tokens × depth × width (residual stream) and × MLP width; the logits and their loss with tokens × vocabulary."""
    config = model_config(row["model"])
    batch, block = parse_tokens(row["tokens"])
    tokens, layers = batch * block, config.num_hidden_layers
    return [row["params"], tokens * layers * config.hidden_size, tokens * layers * config.intermediate_size,
            tokens * config.vocab_size, 1.0]


def memory_model(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Per setup (ours): least squares of the peak on :func:`model_terms` over the random-Llama rows, and its
    largest relative error on those rows and on the paper models' counted rows, which it did not see."""
    table = []
    for setup in dict.fromkeys(r["setup"] for r in rows):
        ours = [r for r in rows if r["side"] == "ours" and r["setup"] == setup]
        fitted = [r for r in ours if r["model"] not in PAPER_MODELS]
        held_out = [r for r in ours if r["model"] in PAPER_MODELS]
        if len(fitted) < len(MODEL_TERMS) or not held_out:
            continue
        coef = np.linalg.lstsq(np.array([model_terms(r) for r in fitted]),
                               np.array([r["peak_bytes"] for r in fitted], dtype=float), rcond=None)[0]

        def worst(subset: list[dict[str, Any]]) -> str:
            return f"{100 * max(abs(np.dot(coef, model_terms(r)) / r['peak_bytes'] - 1) for r in subset):.1f} %"

        table.append([setup, f"{coef[0]:.2f}", *(f"{c:.1f}" for c in coef[1:4]), f"{coef[4] / 2**20:.0f}",
                      worst(fitted), worst(held_out)])
    return table


def smallest_gpu(peak_gib: float) -> str:
    return next((name for name, gib in GPUS_GIB.items() if peak_gib <= HEADROOM * gib), "sharded (> 141 GB)")


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


def report(rows: list[dict[str, Any]], checks: list[dict[str, Any]], name: str, recorded: dict | None = None) -> None:
    """Write ``results/<name>``; ``recorded``: the command and environment of a result file being re-reported."""
    by_key = {(r["model"], r["tokens"], r["setup"], r["side"]): r for r in rows}
    table, gpu_rows, ratio_rows, chunk_rows = [], [], [], []
    for (model, tokens, setup, side), ours in by_key.items():
        if side != "ours":
            continue
        peft = by_key.get((model, tokens, setup, "peft"))  # none for a setup PEFT cannot run (the chunked loss)
        table.append([model, f"{ours['params'] / 1e9:.2f}B", tokens, setup, gib(ours["peak_bytes"]),
                      gib(peft["peak_bytes"]) if peft else "–",
                      f"{ours['peak_bytes'] / peft['peak_bytes']:.3f}" if peft else "–", gib(ours["at_rest_bytes"])])
        if model in PAPER_MODELS:
            gpu_rows.append([model, tokens, setup, gib(ours["peak_bytes"]),
                             smallest_gpu(ours["peak_bytes"] / 2**30)])
        fp32 = by_key.get((model, tokens, "fp32", "ours"))
        if setup == "bf16 + ckpt" and fp32:
            ratio_rows.append([model, tokens, gib(fp32["peak_bytes"]), gib(ours["peak_bytes"]),
                               f"{fp32['peak_bytes'] / ours['peak_bytes']:.2f}"])
        plain = by_key.get((model, tokens, "bf16 + ckpt", "ours"))
        if setup == CHUNKED.name and plain:
            saved = plain["peak_bytes"] - ours["peak_bytes"]
            chunk_rows.append([model, tokens, gib(plain["peak_bytes"]), gib(ours["peak_bytes"]), gib(saved),
                               f"{100 * saved / plain['peak_bytes']:.0f} %", smallest_gpu(ours["peak_bytes"] / 2**30)])
    check_rows = [[c["size"], c["tokens"], c["setup"], c["side"], c["real_bytes"], c["meta_bytes"] or "–",
                   "real only" if c["meta_bytes"] is None else "yes" if c["real_bytes"] == c["meta_bytes"] else "NO"]
                  for c in checks]
    sections = [
        "# Peak tensor memory of one LoRA training step, ours vs PEFT (counted op by op, on the meta device or real tensors)",
        "Bytes of tensor storage alive at the step's peak (weights, adapters, saved activations, gradients, AdamW "
        "state, temporaries), counted op by op (`benchmarks/tensor_memory.py`) for LoRA r=16 on all linear layers, "
        "one step of forward + loss + backward + AdamW. This is what `torch.cuda.max_memory_allocated` reports; a "
        "GPU also holds the CUDA context and kernel workspaces (about 0.5–1 GiB) and its allocator's cache, not "
        "counted here. No GPU figure here was measured.",
    ]
    if checks:
        sections += ["## Counted on meta vs real tensors (same step, real compute on this CPU)",
                     markdown_table(["size", "tokens", "setup", "side", "real bytes", "meta bytes", "equal"],
                                    check_rows, align="llllrrl")]
    if rows:
        sections += [
            "## Peak per step (GiB)",
            markdown_table(["model", "params", "tokens", "setup", "ours peak", "PEFT peak", "ours/PEFT",
                            "ours at rest"], table, align="llllrrrr"),
        ]
    fitted = memory_model(rows)
    if fitted:
        sections += [
            "## Memory model: peak = a·params + b·tokens·layers·hidden + c·tokens·layers·mlp + d·tokens·vocab + e",
            "Fitted per setup to our 135M–1.5B rows only; the last column is its error on the paper models' counted "
            "peaks (7B–70B, other vocabularies and widths), which it did not see.",
            markdown_table(["setup", "a (bytes/param)", "b (bytes)", "c (bytes)", "d (bytes)", "e (MiB)",
                            "max error, fitted rows", "max error, paper models"], fitted, align="lrrrrrrr"),
        ]
    if ratio_rows:
        sections += [
            "## bf16 base + checkpointing vs fp32 base (ours)",
            markdown_table(["model", "tokens", "fp32 peak", "bf16 + ckpt peak", "fp32 / (bf16 + ckpt)"], ratio_rows,
                           align="llrrr"),
        ]
    if chunk_rows:
        sections += [
            f"## The loss in chunks of {CHUNKED.loss_chunk_tokens} tokens (`loss_chunk_tokens`, ours; bf16 + ckpt)",
            "The output layer and the cross-entropy run on one chunk of tokens at a time, each chunk recomputed in the "
            "backward, so the tokens × vocabulary logits (12 bytes per token and word: bf16 logits, their fp32 "
            "upcast, both gradients) are never whole; PEFT has no such option.",
            markdown_table(["model", "tokens", "plain loss peak", "chunked peak", "saved GiB", "saved", "GPU, chunked"],
                           chunk_rows, align="llrrrrl"),
        ]
    if gpu_rows:
        sections += [
            "## Smallest single GPU (ours), counted peak ≤ 90 % of its memory",
            markdown_table(["model", "tokens", "setup", "peak GiB", "GPU"], gpu_rows, align="lllrl"),
        ]
    markdown = "\n\n".join(sections)
    recorded = recorded or {}
    write_results(name, {"rows": rows, "checks": checks, "paper_models": PAPER_MODELS,
                         "environment": recorded.get("environment")}, markdown, recorded.get("command"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["135M", "0.5B", "1.5B", *PAPER_MODELS],
                        choices=[*SHAPES, *PAPER_MODELS])
    parser.add_argument("--tokens", nargs="+", default=["2x512", "2x2048", "4x2048"], metavar="BxT")
    parser.add_argument("--setups", nargs="+", default=COUNTED_SETUPS, choices=[*COUNTED_SETUPS, CHUNKED.name],
                        help=f"'{CHUNKED.name}' is counted for our side only")
    parser.add_argument("--validate", nargs="*", default=[], metavar="SIZE:BxT",
                        help="count these random-Llama rows on real tensors and on meta, in --validate-setups")
    parser.add_argument("--validate-setups", nargs="+", default=["fp32", "fp32 + ckpt"], choices=list(SETUPS),
                        help="a quantised setup is counted on real tensors only (quantising needs the weights)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora_lightning_random_llama"))
    parser.add_argument("--name", default="memory_accounting")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="re-write the report of this result file (keeps the command that counted it)")
    args = parser.parse_args()
    if args.report:
        data = json.loads(args.report.read_text())
        report(data["rows"], data["checks"], args.report.stem, data)
        return
    checks = []
    for entry in args.validate:
        size, tokens = entry.split(":")
        batch, block = parse_tokens(tokens)
        folder = save_random_backbone(size, args.cache / f"{size}-float32", torch.float32)
        for setup in args.validate_setups:
            for side in BUILDERS:
                real = count_step(folder, side, setup, batch, block, meta=False)["peak_bytes"]
                quantized = SETUPS[setup].quantization != "none"
                meta = None if quantized else count_step(folder, side, setup, batch, block, meta=True)["peak_bytes"]
                checks.append({"size": size, "tokens": tokens, "setup": setup, "side": side, "real_bytes": real,
                               "meta_bytes": meta})
                print(json.dumps(checks[-1]), flush=True)
    rows = []
    for model in args.models:
        folder = config_folder(model, args.cache)
        for tokens in args.tokens:
            batch, block = parse_tokens(tokens)
            for setup in args.setups:
                for side in BUILDERS if not ALL_SETUPS[setup].loss_chunk_tokens else ["ours"]:
                    rows.append({"model": model, "tokens": tokens, "setup": setup, "side": side,
                                 **count_step(folder, side, setup, batch, block, meta=True)})
                    print(f"{model} {tokens} {setup} {side}: {gib(rows[-1]['peak_bytes'])} GiB", flush=True)
    report(rows, checks, args.name)


if __name__ == "__main__":
    main()
