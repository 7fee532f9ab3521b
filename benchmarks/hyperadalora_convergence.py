"""Convergence of HyperAdaLoRA against AdaLoRA, LoRA and HyperLoRA (issue 5's headline figure).

MiniLM (packaged alias ``minilm``) on Rotten Tomatoes, every contender on the same pre-drawn training batches and the
same validation subset, several seeds; validation every ``--val-every`` optimiser steps. Reported per contender
(medians over seeds): optimiser steps and training wall-clock to reach a target validation accuracy (``--target-frac``
× AdaLoRA's median final accuracy), final accuracy, median per-step time (validation excluded), and ratios against
AdaLoRA. Writes ``benchmarks/results/hyperadalora_convergence.{json,md,png}``.

    python benchmarks/hyperadalora_convergence.py                      # the committed numbers (~25 min, 2 cores)
    python benchmarks/hyperadalora_convergence.py --steps 20 --seeds 0 # a smoke run
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import write_results  # noqa: E402
from lora_lightning.data import TextClassificationDataModule  # noqa: E402
from lora_lightning.modules import AdaLoRAModule, LoRAModule  # noqa: E402
from lora_lightning.modules.hyperadalora import HyperAdaLoRAModule, HyperLoRAModule  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def contenders(args) -> dict[str, tuple[type, dict]]:
    common = dict(backbone="minilm", target_modules=TARGETS, learning_rate=args.lr, warmup_ratio=0.06)
    ada = dict(init_r=args.init_r, target_r=args.target_r, alpha=args.alpha, orth_reg_weight=0.1,
               tinit=0.1, tfinal=0.2, delta_t=10)
    hyper = dict(hypernet_lr=args.hypernet_lr, hypernet_warmup=args.hypernet_warmup)
    table = {
        "LoRA": (LoRAModule, dict(common, rank=args.target_r, alpha=args.alpha)),
        "AdaLoRA": (AdaLoRAModule, dict(common, **ada)),
        "HyperAdaLoRA-residual": (HyperAdaLoRAModule, dict(common, **ada, **hyper, mode="residual")),
        "HyperAdaLoRA-recurrent": (HyperAdaLoRAModule, dict(common, **ada, **hyper, mode="recurrent")),
        "HyperAdaLoRA-seeded": (HyperAdaLoRAModule, dict(common, **ada, **hyper, mode="seeded")),
        "HyperLoRA": (HyperLoRAModule, dict(common, **hyper, rank=args.target_r, alpha=args.alpha, mode="residual")),
    }
    return {k: v for k, v in table.items() if not args.only or k in args.only}


class Recorder(Callback):
    """Validation accuracy per step, training time per optimiser step (validation excluded)."""

    def __init__(self) -> None:
        self.curve: list[tuple[int, float, float]] = []  # (step, accuracy, training seconds so far)
        self.step_times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer, pl_module):
        if self._last is not None:
            self.step_times.append(time.perf_counter() - self._last)

    def on_validation_start(self, trainer, pl_module):
        if self._last is not None:  # close the step that ended before validation
            self.step_times.append(time.perf_counter() - self._last)
            self._last = None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val/accuracy"])
        self.curve.append((trainer.global_step, acc, sum(self.step_times)))


def draw_batches(args, seed: int):
    dm = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=args.max_length,
                                      batch_size=args.batch_size, eval_batch_size=100,
                                      max_eval_samples=args.val_samples, seed=42)
    dm.setup("fit")
    torch.manual_seed(1000 + seed)
    train, it = [], iter(dm.train_dataloader())
    while len(train) < args.steps:
        try:
            train.append(next(it))
        except StopIteration:
            it = iter(dm.train_dataloader())
    return train, list(dm.val_dataloader())


def run_one(cls, kwargs, train, val, args, seed: int) -> dict:
    L.seed_everything(seed, workers=True, verbose=False)
    model = cls(**kwargs)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=args.val_every, callbacks=[recorder], default_root_dir=args.workdir,
    )
    trainer.fit(model, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    return {"curve": recorder.curve, "step_times": recorder.step_times[2:]}  # first steps: lazy init


def majority(args) -> float:
    """Accuracy of always predicting the most frequent label of the validation subset (the floor)."""
    dm = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=args.max_length,
                                      batch_size=args.batch_size, eval_batch_size=100,
                                      max_eval_samples=args.val_samples, seed=42)
    dm.setup("fit")
    labels = torch.cat([b["labels"] for b in dm.val_dataloader()])
    return float(torch.bincount(labels).max()) / len(labels)


def first_reaching(curve, target: float):
    for step, acc, seconds in curve:
        if acc >= target:
            return step, seconds
    return None, None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--val-every", type=int, default=20)
    parser.add_argument("--val-samples", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hypernet-lr", type=float, default=None)
    parser.add_argument("--hypernet-warmup", type=float, default=0.05)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-frac", type=float, default=0.95)
    parser.add_argument("--target-acc", type=float, default=None,
                        help="an absolute target accuracy instead of --target-frac × the reference's final accuracy")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine result JSONs of runs over disjoint seeds (run in parallel) into one report")
    parser.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                        help="instead: time training steps of every contender round-robin (common.interleaved_times)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", default="hyperadalora_convergence")
    parser.add_argument("--workdir", default="/tmp/hyperadalora_convergence")
    args = parser.parse_args(argv)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.merge:
        merge(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_time:
        step_time(args)
        return
    table = contenders(args)
    runs: dict[str, list[dict]] = {name: [] for name in table}
    for done, seed in enumerate(args.seeds, 1):
        train, val = draw_batches(args, seed)
        for name, (cls, kwargs) in table.items():  # same batches for every contender of a seed
            start = time.perf_counter()
            result = run_one(cls, kwargs, train, val, args, seed)
            runs[name].append(result)
            print(f"seed {seed} {name}: final acc {result['curve'][-1][1]:.4f}, "
                  f"{statistics.median(result['step_times']) * 1e3:.0f} ms/step, {time.perf_counter() - start:.0f} s",
                  flush=True)
        report(runs, args, args.seeds[:done])  # after every seed, so an interrupted run still leaves its numbers


def step_time(args) -> None:
    """Median training-step time (forward, backward, optimiser step, rank scheduler excluded) per contender,
    contenders interleaved round by round so machine drift hits all alike; ratios are paired per round."""
    from common import interleaved_times, paired_ratio, summarize

    train, _ = draw_batches(args, 0)
    steps = {}
    for name, (cls, kwargs) in contenders(args).items():
        L.seed_everything(0, verbose=False)
        module = cls(**kwargs).train()
        optimizer = torch.optim.AdamW(module.param_groups(), lr=args.lr)

        def one(i, module=module, optimizer=optimizer):
            batch = train[i % len(train)]
            loss = module.task.loss(module(batch), batch)
            extra = module.extra_losses()
            (loss + sum(extra.values()) if extra else loss).backward()
            optimizer.step()
            optimizer.zero_grad()
            if getattr(module, "hypernet", None) is not None:
                module.hypernet.recurrent_update()
        steps[name] = one
    times = interleaved_times(steps, steps=args.step_time, warmup=2)
    ref = "AdaLoRA"
    lines = ["| method | median ms/step | × AdaLoRA (paired) |", "|---|---|---|"]
    payload = {}
    for name, t in times.items():
        ratio = paired_ratio(t, times[ref])
        payload[name] = {**summarize(t), "ratio_vs_adalora": ratio}
        lines.append(f"| {name} | {payload[name]['median_ms']:.0f} | {ratio:.2f} |")
    markdown = (f"Training step (forward + backward + AdamW step), MiniLM, batch {args.batch_size}, seq "
                f"{args.max_length}, {args.step_time} interleaved rounds after 2 warm-up rounds.\n\n" + "\n".join(lines))
    print(markdown)
    write_results(f"{args.name}_step_time", {"args": vars(args), "results": payload}, markdown)


def merge(args) -> None:
    import json

    runs: dict[str, list[dict]] = {}
    seeds = []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        seeds += data.get("seeds_done") or data["args"]["seeds"]
        for name, row in data["results"].items():
            per_seed = row.get("step_ms_per_seed") or [row["step_ms"]] * len(row["curves"])
            for curve, ms in zip(row["curves"], per_seed):
                runs.setdefault(name, []).append({"curve": [tuple(c) for c in curve], "step_times": [ms / 1e3]})
        for key in ("steps", "val_every", "val_samples", "batch_size", "max_length", "target_frac"):
            setattr(args, key, data["args"][key])
    args.seeds = sorted(set(seeds))  # files may split one seed's contenders
    report(runs, args, args.seeds)


def report(runs, args, seeds) -> None:
    reference = "AdaLoRA" if "AdaLoRA" in runs else next(iter(runs))
    ref_final = med([r["curve"][-1][1] for r in runs[reference]])
    target = args.target_acc if args.target_acc is not None else args.target_frac * ref_final
    rows = {}
    for name, results in runs.items():
        reach = [first_reaching(r["curve"], target) for r in results]
        rows[name] = {
            "final_acc": med([r["curve"][-1][1] for r in results]),
            "final_acc_per_seed": [r["curve"][-1][1] for r in results],
            "best_acc": med([max(a for _, a, _ in r["curve"]) for r in results]),
            "steps_to_target": med([s for s, _ in reach]),
            "steps_to_target_per_seed": [s for s, _ in reach],
            "seconds_to_target": med([t for _, t in reach]),
            "reached": sum(s is not None for s, _ in reach),
            "seeds": len(results),
            "step_ms": 1e3 * med([statistics.median(r["step_times"]) for r in results]),
            "step_ms_per_seed": [1e3 * statistics.median(r["step_times"]) for r in results],
            "curves": [r["curve"] for r in results],
        }
    ref = rows[reference]
    for row in rows.values():
        row["steps_ratio"] = (row["steps_to_target"] / ref["steps_to_target"]
                              if row["steps_to_target"] and ref["steps_to_target"] else None)
        row["time_ratio"] = (row["seconds_to_target"] / ref["seconds_to_target"]
                             if row["seconds_to_target"] and ref["seconds_to_target"] else None)
        row["step_time_ratio"] = row["step_ms"] / ref["step_ms"]
        row["final_acc_delta_pt"] = 100 * (row["final_acc"] - ref["final_acc"])

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        (f"Target: accuracy {target:.4f} (absolute). " if args.target_acc is not None else
         f"Target: {args.target_frac:.0%} of {reference}'s median final accuracy = {target:.4f}. ") +
        f"Validation majority-class accuracy: {majority(args):.4f}. "
        f"{len(seeds)} seeds ({seeds}), {args.steps} steps, batch {args.batch_size}, seq {args.max_length}, "
        f"validation on {args.val_samples} examples every {args.val_every} steps. Medians over seeds.",
        "",
        "| method | final acc | Δ vs AdaLoRA (pt) | steps to target | × AdaLoRA | s to target | × AdaLoRA "
        "| ms/step | × AdaLoRA | seeds reaching |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['final_acc']:.4f} | {r['final_acc_delta_pt']:+.2f} | {fmt(r['steps_to_target'], '.0f')} "
            f"| {fmt(r['steps_ratio'], '.2f')} | {fmt(r['seconds_to_target'], '.1f')} | {fmt(r['time_ratio'], '.2f')} "
            f"| {r['step_ms']:.0f} | {r['step_time_ratio']:.2f} | {r['reached']}/{r['seeds']} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    payload = {"args": vars(args), "seeds_done": seeds, "target_accuracy": target, "reference": reference, "results": rows}
    write_results(args.name, payload, markdown)
    plot(rows, target, Path(__file__).resolve().parent / "results" / f"{args.name}.png")


def plot(rows, target, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in rows.items():
        curves = row["curves"]
        steps = [s for s, _, _ in curves[0]]
        accs = [statistics.median(c[i][1] for c in curves) for i in range(len(steps))]
        lo = [min(c[i][1] for c in curves) for i in range(len(steps))]
        hi = [max(c[i][1] for c in curves) for i in range(len(steps))]
        line, = ax.plot(steps, accs, marker="o", ms=3, label=name)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation accuracy (median, min–max over seeds)")
    ax.set_title("MiniLM on Rotten Tomatoes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
