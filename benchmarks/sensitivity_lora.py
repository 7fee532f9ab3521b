"""Sensitivity-LoRA on MiniLM / Rotten Tomatoes: allocation cost, step time and quality at equal total rank.

Contenders (same packaged MiniLM, same data, same seeds, same targets ``query, key, value, dense``, 300 steps of
batch 16 at sequence length 64, AdamW lr 1e-3 with 6 % warmup and linear decay, dropout 0.05):

* ``lora``: our LoRAModule, rank 8, alpha 16 (total rank 8 · n).
* ``sens-<estimator>``: SensitivityLoRAModule with ``r_avg=8`` (same total rank 8 · n), alpha 16, the module's
  default ``r_min=1``, ``r_max=24`` (as the shipped configs) and ``num_batches=16`` calibration batches from the training loader;
  one row per estimator (``activation`` = the paper's, ``fisher``, ``hutchinson``).
* ``adalora``: AdaLoRAModule init_r 12 → target_r 8 (same final budget), when the class exists.

Measured per run: validation accuracy after the last step (whole validation split), the wall time of the fit
(including the allocation), the allocation time (``HessianSensitivityEstimator.allocation_seconds``) and the
median training-step time (timed between ``on_train_batch_start`` and ``on_train_batch_end``).
Allocation cost is reported as a share of the LoRA fit time. The step-time ratio against LoRA is the median of
per-seed ratios of median step times (runs are sequential, so machine drift is not cancelled: read it as ±2 %).

Usage (from the repository root; ~20 minutes on 2 CPU cores)::

    python benchmarks/sensitivity_lora.py --seeds 0 1 2 --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

from common import quiet_cpu_trainer, reproduce_command  # benchmarks/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TARGETS = ["query", "key", "value", "dense"]


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def build(name: str, steps: int):
    from lora_lightning import modules

    common = dict(backbone="minilm", num_labels=2, target_modules=TARGETS, learning_rate=1e-3, warmup_ratio=0.06)
    if name == "lora":
        return modules.LoRAModule(rank=8, alpha=16, dropout=0.05, **common)
    if name.startswith("sens-"):
        # r_max as the shipped configs (3 x r_avg): without it fisher/hutchinson pile most ranks onto the pooler.
        return modules.SensitivityLoRAModule(r_avg=8, r_max=24, alpha=16, dropout=0.05, estimator=name[5:],
                                             num_batches=16, **common)
    if name == "adalora":
        # as configs/adalora/minilm_rotten_tomatoes.yaml (scale alpha / init_r = 2, like LoRA's 16 / 8)
        return modules.AdaLoRAModule(init_r=12, target_r=8, alpha=24, dropout=0.05, orth_reg_weight=0.1, tinit=0.1,
                                     tfinal=0.2, delta_t=10, total_step=steps, **common)
    raise ValueError(name)


_DATA = None


def run(name: str, seed: int, steps: int) -> dict:
    from lora_lightning.callbacks.sensitivity import HessianSensitivityEstimator
    from lora_lightning.data import TextClassificationDataModule

    global _DATA
    if _DATA is None:  # tokenised once, reused by every run (its split is seeded, not run-dependent)
        _DATA = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=64,
                                             batch_size=16, eval_batch_size=64, seed=42)
    data = _DATA
    L.seed_everything(seed, workers=True)
    model = build(name, steps)
    timer = StepTimer()
    with quiet_cpu_trainer(max_steps=steps, callbacks=[timer]) as trainer:
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        fit_seconds = time.perf_counter() - start
        result = trainer.validate(model, datamodule=data, verbose=False)[0]
    estimator = next((c for c in trainer.callbacks if isinstance(c, HessianSensitivityEstimator)), None)
    ranks = getattr(model, "allocation", None)
    return {
        "method": name, "seed": seed, "val_accuracy": float(result["val/accuracy"]), "fit_seconds": fit_seconds,
        "allocation_seconds": estimator.allocation_seconds if estimator else 0.0,
        "median_step_ms": 1e3 * statistics.median(timer.times[5:]),
        "rank_min": min(ranks.values()) if ranks else None, "rank_max": max(ranks.values()) if ranks else None,
        "ranks": ranks,
    }


def summarise(runs: list[dict], steps: int, seeds: list[int]) -> tuple[str, dict]:
    """Markdown table and per-method summary; ratios against the LoRA run of the same seed."""
    methods = list(dict.fromkeys(r["method"] for r in runs))

    def of(method, key):
        return [r[key] for r in runs if r["method"] == method]

    lora_fit = {r["seed"]: r["fit_seconds"] for r in runs if r["method"] == "lora"}
    lora_step = {r["seed"]: r["median_step_ms"] for r in runs if r["method"] == "lora"}
    rows, summary = [], {}
    for method in methods:
        acc = of(method, "val_accuracy")
        per_seed = [r for r in runs if r["method"] == method and r["seed"] in lora_step]
        share = statistics.median(r["allocation_seconds"] / lora_fit[r["seed"]] for r in per_seed) if per_seed else None
        share300 = statistics.median(
            r["allocation_seconds"] / (300 * lora_step[r["seed"]] / 1e3) for r in per_seed) if per_seed else None
        ratio = statistics.median(r["median_step_ms"] / lora_step[r["seed"]] for r in per_seed) if per_seed else None
        summary[method] = {
            "seeds": of(method, "seed"), "val_accuracy_mean": statistics.mean(acc),
            "val_accuracy_std": statistics.pstdev(acc), "fit_seconds_mean": statistics.mean(of(method, "fit_seconds")),
            "allocation_seconds_median": statistics.median(of(method, "allocation_seconds")),
            "allocation_share_of_lora_fit": share, "allocation_share_of_300_lora_steps": share300,
            "step_time_ratio_vs_lora": ratio,
        }
        s = summary[method]
        pct = lambda x: "n/a" if x is None else f"{100 * x:.2f} %"
        lows, highs = of(method, "rank_min"), of(method, "rank_max")
        rows.append(
            f"| {method} | {100 * s['val_accuracy_mean']:.2f} ± {100 * s['val_accuracy_std']:.2f} | "
            f"{s['fit_seconds_mean']:.0f} | {s['allocation_seconds_median']:.1f} | {pct(share)} | {pct(share300)} | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}'} | "
            + (f"{min(lows)}–{max(highs)}" if lows and lows[0] is not None else "8 (uniform)") + " |"
        )
    table = "\n".join([
        f"MiniLM / Rotten Tomatoes, {steps} steps, batch 16, seq 64, seeds {seeds} (val accuracy mean ± population "
        "std over seeds; whole validation split).",
        "",
        "| method | val acc % | fit s (incl. allocation) | allocation s | allocation / LoRA fit "
        "| allocation / 300 LoRA steps | step time / LoRA | rank range |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    return table, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", nargs="+",
                        default=["lora", "sens-activation", "sens-fisher", "sens-hutchinson", "adalora"])
    parser.add_argument("--merge", nargs="+", help="only summarise the runs of these files (runs split over processes: "
                        "*.partial.json or result files); the result records the command that runs them in one")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--name", default="sensitivity_lora_minilm_rotten_tomatoes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lora_lightning import modules

    methods = [m for m in args.methods if m != "adalora" or hasattr(modules, "AdaLoRAModule")]
    runs = []
    if args.merge:
        for path in args.merge:
            content = json.loads(Path(path).read_text())
            runs.extend(content["runs"] if isinstance(content, dict) else content)  # a result file or a partial one
        args.seeds = sorted({r["seed"] for r in runs})
        methods = list(dict.fromkeys(r["method"] for r in runs))
    for seed in [] if args.merge else args.seeds:
        for method in methods:
            runs.append(run(method, seed, args.steps))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "ranks"}), flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{args.name}.partial.json").write_text(json.dumps(runs, indent=1) + "\n")

    table, summary = summarise(runs, args.steps, args.seeds)
    print(table)
    argv = sys.argv[1:] if not args.merge else [  # the one command that computes the merged runs
        "--seeds", *map(str, args.seeds), "--steps", str(args.steps), "--methods", *methods, "--name", args.name]
    command = reproduce_command([__file__, *argv])
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": args.name, "command": command, "summary": summary, "runs": runs,
        "environment": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version(),
                        "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads()},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(f"{table}\n\nReproduce (from the repository root):\n\n```\n{command}\n```\n")
    (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)  # its runs are in the result file now


if __name__ == "__main__":
    main()
