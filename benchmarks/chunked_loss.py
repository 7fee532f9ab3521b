"""The chunked causal-LM loss (``loss_chunk_tokens``) against the plain loss, side by side in one run.

On the packaged SmolLM2-135M (fp32) and real Hamlet text, LoRA r=8 on the attention projections: one training step
(forward, loss, backward, AdamW) of each contender, rounds interleaved so that machine drift hits both alike; the
median step time and the median of per-round paired ratios against the plain loss; the step's peak tensor memory
counted op by op on the real tensors (``tensor_memory.PeakTensorMemory``, what ``torch.cuda.max_memory_allocated``
reports on a GPU); and the largest difference between the contenders' losses over the timed steps (the same batches
and initial adapters: the loss is the same function). SmolLM2's output layer is a fifth of its parameters, so the
extra pass of it that chunking costs weighs more here than on a 7B–8B model (output layer 6–7 % of the parameters).

    python benchmarks/chunked_loss.py          # 10–25 minutes on 2 CPU cores (25: one thread, cores shared)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (environment, interleaved_times, markdown_table, module_training_step, paired_ratio,  # noqa: E402
                    summarize, write_results)
from lora_lightning.data import CausalLMDataModule  # noqa: E402
from lora_lightning.modules import LoRAModule  # noqa: E402
from tensor_memory import PeakTensorMemory  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def hamlet_batches(batch_size: int, block_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    dm = CausalLMDataModule(backbone="smollm2", source="hamlet", block_size=block_size, batch_size=batch_size, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise ValueError(f"Hamlet has fewer than {count} batches of {batch_size} x {block_size} tokens.")


def build(chunk_tokens: int) -> LoRAModule:
    torch.manual_seed(0)  # the same initial adapters for every contender
    return LoRAModule(backbone="smollm2", task="causal-lm", target_modules=TARGETS, rank=8, alpha=16, dropout=0.0,
                      loss_chunk_tokens=chunk_tokens)


def peak_bytes(step, module: LoRAModule, batch: dict[str, torch.Tensor], index: int) -> int:
    """Tensor bytes alive at the peak of training step ``index`` (after the warm-up, so AdamW's state exists)."""
    counter = PeakTensorMemory([*module.parameters(), *module.buffers(), *batch.values()])
    with counter:
        step(index)
    return counter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 128], help="loss_chunk_tokens values")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="chunked_loss")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = hamlet_batches(args.batch_size, args.block_size, args.warmup + args.steps)
    contenders = {"plain": 0, **{f"chunks of {c}": c for c in args.chunks}}
    modules = {name: build(chunk) for name, chunk in contenders.items()}
    steps = {name: module_training_step(module, batches, torch.optim.AdamW(module.param_groups(), lr=1e-4))
             for name, module in modules.items()}
    times = interleaved_times(steps, steps=args.steps, warmup=args.warmup)
    peaks = {name: peak_bytes(steps[name], module, batches[0], args.warmup + args.steps)
             for name, module in modules.items()}
    losses = {}
    with torch.no_grad():  # the same function: the loss of every contender on every batch, after the same steps
        for name, module in modules.items():
            module.eval()
            losses[name] = [float(module.task.loss(module(batch), batch)) for batch in batches]
    loss_gap = max(abs(a - b) for name in modules for a, b in zip(losses[name], losses["plain"]))

    rows, payload = [], {}
    for name, seconds in times.items():
        ratio = paired_ratio(seconds, times["plain"])
        payload[name] = {**summarize(seconds), "ratio_vs_plain": ratio, "peak_bytes": peaks[name],
                         "peak_ratio_vs_plain": peaks[name] / peaks["plain"], "loss_chunk_tokens": contenders[name]}
        rows.append([name, f"{payload[name]['median_ms']:.0f}", f"{ratio:.2f}", f"{peaks[name] / 2**20:.0f}",
                     f"{peaks[name] / peaks['plain']:.2f}"])
    tokens = args.batch_size * args.block_size
    markdown = "\n\n".join([
        f"# The loss in chunks vs the plain loss: SmolLM2-135M, {args.batch_size} × {args.block_size} tokens, fp32",
        f"{args.steps} interleaved rounds after {args.warmup} warm-up rounds; peak tensor memory of one step counted "
        f"on the real tensors. Largest difference between a chunked and the plain loss, on the {len(batches)} "
        f"batches after training: {loss_gap:.2e}. The plain loss's logits alone are {tokens} × 49,152 × 4 bytes = "
        f"{tokens * 49152 * 4 / 2**20:.0f} MiB in fp32.",
        markdown_table(["loss", "median ms/step", "× plain (paired)", "peak MiB", "× plain"], rows, align="lrrrr"),
    ])
    print(markdown)
    write_results(args.name, {"args": vars(args), "environment": environment(), "loss_gap": loss_gap,
                              "results": payload}, markdown)


if __name__ == "__main__":
    main()
