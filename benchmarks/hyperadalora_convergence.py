"""Convergence of HyperAdaLoRA against AdaLoRA, LoRA and HyperLoRA (issue 5's headline figure).

MiniLM (packaged alias ``minilm``) on Rotten Tomatoes, every contender on the same pre-drawn training batches and the
same validation subset, several seeds; validation every ``--val-every`` optimiser steps. Reported per contender
(medians over seeds): optimiser steps and training wall-clock to reach a target validation accuracy (``--target-frac``
× AdaLoRA's median final accuracy), final accuracy, median per-step time (validation excluded), and ratios against
AdaLoRA. AdaLoRA and HyperAdaLoRA train at ``--lr``, LoRA and HyperLoRA at ``--lora-lr``, every generator at
``--hypernet-lr-ratio`` × its contender's rate. Writes ``benchmarks/results/<name>.{json,md,png}``.

    python benchmarks/hyperadalora_convergence.py                      # the committed setup (~1 h on 2 cores)
    python benchmarks/hyperadalora_convergence.py --steps 20 --seeds 0 # a smoke run
    python benchmarks/hyperadalora_convergence.py --seeds 1 2 --only LoRA AdaLoRA --name part_a   # in parallel with
    python benchmarks/hyperadalora_convergence.py --seeds 1 2 --only HyperLoRA --name part_b      # another part, then
    python benchmarks/hyperadalora_convergence.py --merge benchmarks/results/part_a.json benchmarks/results/part_b.json
"""
from __future__ import annotations

import argparse
import functools
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
    lora_lr = args.lora_lr or args.lr  # results written before --lora-lr existed have None
    common = dict(backbone="minilm", target_modules=TARGETS, warmup_ratio=0.06)
    ada = dict(common, learning_rate=args.lr, init_r=args.init_r, target_r=args.target_r, alpha=args.alpha,
               orth_reg_weight=0.1, tinit=0.1, tfinal=0.2, delta_t=10)
    lora = dict(common, learning_rate=lora_lr, rank=args.target_r, alpha=args.alpha)

    def hyper(lr: float, mode: str) -> dict:
        return dict(hypernet_lr=args.hypernet_lr_ratio * lr, hypernet_warmup=args.hypernet_warmup, mode=mode)

    table = {
        "LoRA": (LoRAModule, lora),
        "AdaLoRA": (AdaLoRAModule, ada),
        "HyperAdaLoRA-residual": (HyperAdaLoRAModule, dict(ada, **hyper(args.lr, "residual"))),
        "HyperAdaLoRA-recurrent": (HyperAdaLoRAModule, dict(ada, **hyper(args.lr, "recurrent"))),
        "HyperAdaLoRA-seeded": (HyperAdaLoRAModule, dict(ada, **hyper(args.lr, "seeded"))),
        "HyperLoRA": (HyperLoRAModule, dict(lora, **hyper(lora_lr, "residual"))),
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


def datamodule(max_length: int, batch_size: int, val_samples: int) -> TextClassificationDataModule:
    """Rotten Tomatoes for MiniLM, set up: the same validation subset (data seed 42) for every run."""
    dm = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=max_length,
                                      batch_size=batch_size, eval_batch_size=100, max_eval_samples=val_samples,
                                      seed=42)
    dm.setup("fit")
    return dm


def draw_batches(args, seed: int):
    dm = datamodule(args.max_length, args.batch_size, args.val_samples)
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


@functools.lru_cache
def majority(max_length: int, batch_size: int, val_samples: int) -> float:
    """Accuracy of always predicting the most frequent label of the validation subset (the floor); computed once
    per data setting, not at every report."""
    dm = datamodule(max_length, batch_size, val_samples)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--val-samples", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3, help="AdaLoRA and HyperAdaLoRA learning rate")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA and HyperLoRA learning rate")
    parser.add_argument("--hypernet-lr-ratio", type=float, default=0.1,
                        help="hypernet_lr = this × the contender's learning rate")
    parser.add_argument("--hypernet-warmup", type=float, default=0.05)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-frac", type=float, default=0.95)
    parser.add_argument("--target-acc", type=float, default=None,
                        help="an absolute target accuracy instead of --target-frac × the reference's final accuracy")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON[:NAME,...]",
                        help="combine result JSONs of runs over disjoint seeds or contenders (run in parallel) into "
                             "one report; ':NAME,...' takes only those contenders from a file")
    parser.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                        help="instead: time training steps of every contender round-robin (common.interleaved_times)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--name", default="hyperadalora_convergence")
    parser.add_argument("--workdir", default="/tmp/hyperadalora_convergence")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
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
    from common import interleaved_times, module_training_step, paired_ratio, summarize

    train, _ = draw_batches(args, 0)
    steps = {}
    for name, (cls, kwargs) in contenders(args).items():
        L.seed_everything(0, verbose=False)
        module = cls(**kwargs)
        hypernet = getattr(module, "hypernet", None)
        steps[name] = module_training_step(module, train, torch.optim.AdamW(module.param_groups(), lr=args.lr),
                                           after_step=hypernet.recurrent_update if hypernet is not None else None)
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


def contender_settings(file_args: dict, name: str) -> dict:
    """The constructor arguments a result file's run gave contender ``name``. Files written before
    ``--lora-lr``/``--hypernet-lr-ratio`` existed used ``--lr`` for every contender and an absolute
    ``--hypernet-lr`` (None: the contender's lr)."""
    values = {**vars(build_parser().parse_args([])), **file_args, "only": None}
    if "hypernet_lr_ratio" not in file_args:
        values["lora_lr"] = None
        old = file_args.get("hypernet_lr")
        values["hypernet_lr_ratio"] = 1.0 if old is None else round(old / file_args["lr"], 12)
    cls, kwargs = contenders(argparse.Namespace(**values))[name]
    return {"class": cls.__name__, **kwargs}


def merge(args) -> None:
    """Combine result files; refuses contenders whose settings differ between files (other lr, ratio, ...)."""
    import json

    runs: dict[str, list[dict]] = {}
    settings: dict[str, dict] = {}
    seeds = []
    for spec in args.merge:
        path, _, names = spec.partition(":")
        data = json.loads(Path(path).read_text())
        wanted = names.split(",") if names else list(data["results"])
        missing = [n for n in wanted if n not in data["results"]]
        if missing:
            raise SystemExit(f"{path} has no results for {missing}; it has {list(data['results'])}.")
        seeds += data.get("seeds_done") or data["args"]["seeds"]
        for name in wanted:
            these = contender_settings(data["args"], name)
            if settings.setdefault(name, these) != these:
                raise SystemExit(f"{name} in {path} ran with {these}, elsewhere with {settings[name]}: not mergeable.")
            row = data["results"][name]
            per_seed = row.get("step_ms_per_seed") or [row["step_ms"]] * len(row["curves"])
            for curve, ms in zip(row["curves"], per_seed):
                runs.setdefault(name, []).append({"curve": [tuple(c) for c in curve], "step_times": [ms / 1e3]})
        for key in ("steps", "val_every", "val_samples", "batch_size", "max_length", "target_frac"):
            setattr(args, key, data["args"][key])
    args.seeds = sorted(set(seeds))  # files may split one seed's contenders
    report(runs, args, args.seeds, settings)


def report(runs, args, seeds, settings: dict[str, dict] | None = None) -> None:
    if settings is None:
        settings = {name: {"class": cls.__name__, **kwargs} for name, (cls, kwargs) in contenders(args).items()}
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
        f"Validation majority-class accuracy: {majority(args.max_length, args.batch_size, args.val_samples):.4f}. "
        f"{len(seeds)} seeds ({seeds}), {args.steps} steps, batch {args.batch_size}, seq {args.max_length}, "
        f"validation on {args.val_samples} examples every {args.val_every} steps. Medians over seeds.",
        "",
        "| method | lr (hypernet) | final acc | Δ vs AdaLoRA (pt) | steps to target | × AdaLoRA | s to target "
        "| × AdaLoRA | ms/step | × AdaLoRA | seeds reaching |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        hyper_lr = settings[name].get("hypernet_lr")
        lrs = f"{settings[name]['learning_rate']:g}" + (f" ({hyper_lr:g})" if hyper_lr is not None else "")
        lines.append(
            f"| {name} | {lrs} | {r['final_acc']:.4f} | {r['final_acc_delta_pt']:+.2f} "
            f"| {fmt(r['steps_to_target'], '.0f')} "
            f"| {fmt(r['steps_ratio'], '.2f')} | {fmt(r['seconds_to_target'], '.1f')} | {fmt(r['time_ratio'], '.2f')} "
            f"| {r['step_ms']:.0f} | {r['step_time_ratio']:.2f} | {r['reached']}/{r['seeds']} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    for name, row in rows.items():
        row["settings"] = settings[name]
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
