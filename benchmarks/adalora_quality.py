"""Quality: LoRA r=8 against AdaLoRA (init_r=12 → target_r=8) on MiniLM / Rotten Tomatoes, same steps, several seeds.

Both methods train through a Lightning ``Trainer`` on the packaged MiniLM and the packaged Rotten Tomatoes data
(:class:`lora_lightning.data.TextClassificationDataModule`, sequence length 64, batch 16), all linear layers
adapted, AdamW at the same learning rate with the library's default linear warm-up/decay, for the same number of
optimiser steps; validation accuracy on the same held-out samples at the end. AdaLoRA's scale is α / init_r with
α = 24 (= LoRA's α / r = 16 / 8 = 2), orth_reg_weight 0.1 (the paper's GLUE value), tinit 10 %, tfinal 20 % of the
run, a masking event every ``steps // 20`` steps. Seeds change the adapter initialisation and the data order.

Usage (from the repository root)::

    python benchmarks/adalora_quality.py --steps 150 --seeds 0 1 2

Writes ``benchmarks/results/adalora_quality.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    environment, markdown_table, quiet_cpu_trainer, reproduce_command, write_results,
)
from lora_lightning.data.classification import TextClassificationDataModule  # noqa: E402
from lora_lightning.modules import AdaLoRAModule, LoRAModule  # noqa: E402


def build(method: str, args) -> L.LightningModule:
    common = dict(backbone="minilm", num_labels=2, target_modules="all-linear")
    if method == "lora":
        return LoRAModule(rank=8, alpha=16.0, learning_rate=args.lr, **common)
    return AdaLoRAModule(learning_rate=args.adalora_lr or args.lr, init_r=12, target_r=8, alpha=24.0,
                         orth_reg_weight=0.1, tinit=0.1, tfinal=0.2,
                         delta_t=max(1, args.steps // 20), **common)


class Progress(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % 20 == 0:
            print(f"  step {trainer.global_step} loss {float(outputs['loss']):.3f}", flush=True)


def run(method: str, seed: int, args) -> dict:
    L.seed_everything(seed, verbose=False)
    data = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=64, batch_size=16,
                                        max_eval_samples=args.eval_samples, seed=seed)
    module = build(method, args)
    with quiet_cpu_trainer(max_steps=args.steps, limit_val_batches=0, callbacks=[Progress()]) as trainer:
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        train_s = time.perf_counter() - start
        trainer.limit_val_batches = 1.0
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    result = {"method": method, "seed": seed, "val_accuracy": metrics["val/accuracy"], "val_f1": metrics["val/f1"],
              "val_loss": metrics["val/loss"], "train_seconds": train_s, "steps": trainer.global_step}
    if method == "adalora":
        ranks = module.kept_ranks()
        result.update(total_rank=sum(ranks.values()), modules=len(ranks), min_rank=min(ranks.values()),
                      max_rank=max(ranks.values()), rank_pattern=ranks)
    print(f"{method} seed {seed}: acc {result['val_accuracy']:.4f} ({train_s:.0f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--adalora-lr", type=float, default=None, help="AdaLoRA's learning rate (default: --lr)")
    parser.add_argument("--methods", nargs="+", default=["lora", "adalora"], choices=["lora", "adalora"])
    parser.add_argument("--name", default="adalora_quality", help="results file name under benchmarks/results/")
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    warnings.filterwarnings("ignore")
    runs = [run(method, seed, args) for seed in args.seeds for method in args.methods]
    rows, summary = [], {}
    labels = {"lora": f"LoRA r=8 (α=16), lr {args.lr}",
              "adalora": f"AdaLoRA init_r=12 → target_r=8 (α=24), lr {args.adalora_lr or args.lr}"}
    for method in args.methods:
        label = labels[method]
        accs = [r["val_accuracy"] for r in runs if r["method"] == method]
        mean, spread = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[method] = {"mean_accuracy": mean, "std_accuracy": spread, "accuracies": accs}
        rows.append([label, len(accs), f"{mean:.4f}", f"{spread:.4f}", ", ".join(f"{a:.4f}" for a in accs)])
    ada = [r for r in runs if r["method"] == "adalora"]
    budget = (f"\n\nAdaLoRA final budget: {ada[0]['total_rank']} ranks over {ada[0]['modules']} matrices "
              f"(per-matrix ranks from {min(r['min_rank'] for r in ada)} to {max(r['max_rank'] for r in ada)}).\n"
              if ada else "\n")
    markdown = (
        "# AdaLoRA vs LoRA: MiniLM on Rotten Tomatoes\n\n"
        f"{args.steps} optimiser steps, batch 16, seq 64, all linear layers; validation accuracy on "
        f"{args.eval_samples} held-out samples; seeds {args.seeds}. CPU, torch {torch.__version__}.\n\n"
        + markdown_table(["method", "seeds", "mean acc", "std", "per seed"], rows, align="lrrrl")
        + budget
    )
    print(markdown)
    write_results(args.name, {"settings": vars(args), "summary": summary, "runs": runs,
                                      "environment": environment()}, markdown, reproduce_command())


if __name__ == "__main__":
    main()
