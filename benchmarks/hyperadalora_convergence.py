"""Convergence of HyperAdaLoRA against AdaLoRA, LoRA and HyperLoRA (issues 5 and 13).

Two tasks (``--task``): MiniLM (packaged alias ``minilm``) on Rotten Tomatoes (validation accuracy) and SmolLM2 on
Hamlet (validation perplexity). Every contender runs on the same pre-drawn training batches and the same validation
subset, several seeds; validation every ``--val-every`` optimiser steps. Reported per contender (medians over seeds):
optimiser steps and training wall-clock to reach the target (accuracy ≥ ``--target-frac`` (0.95) × AdaLoRA's median
final accuracy; perplexity ≤ ``--target-frac`` (1.05) × AdaLoRA's), the final metric, median per-step time
(validation excluded), and ratios against AdaLoRA. AdaLoRA and its variants train at ``--lr``, LoRA and HyperLoRA at
``--lora-lr``, every generator at ``--hypernet-lr-ratio`` × its contender's rate, unless ``--lrs-from`` gives each
contender its own rate (the best of an ``--lr-grid`` run). Writes ``benchmarks/results/<name>.{json,md,png}``.

The issue-13 protocol (per task; add ``--task smollm2-hamlet --batch-size 4 --max-length 64`` for Hamlet, ~25 min per
fit on one of two shared CPU cores):

    python benchmarks/hyperadalora_convergence.py --lr-grid 1e-3 2e-3 5e-3 1e-2 --seeds 0 --jobs 2  # <name>_lr_grid.json
    python benchmarks/hyperadalora_convergence.py --lrs-from benchmarks/results/hyperadalora_convergence_lr_grid.json \
        --jobs 2   # seeds 0, 1, 2 at each contender's best rate (seed 0's fit is the grid's, not repeated)

(``--jobs 2`` fits two contenders at a time, one thread each; a grid split by ``--only`` over processes combines
with ``--merge part_a_lr_grid.json part_b_lr_grid.json``; a merged file holds every run and records the command that
computes it in one process, so the parts are not kept)
    python benchmarks/hyperadalora_convergence.py --lrs-from benchmarks/results/hyperadalora_convergence_lr_grid.json \
        --steps 600 --seeds 0 --only AdaLoRA HyperAdaLoRA-triplet-frontload AdaLoRA-lambda-boost \
        --name hyperadalora_convergence_600
    python benchmarks/hyperadalora_convergence.py --diagnose        # step-0 generator diagnostics, a minute

    python benchmarks/hyperadalora_convergence.py --steps 20 --seeds 0 # a smoke run
    python benchmarks/hyperadalora_convergence.py --seeds 1 2 --only LoRA AdaLoRA --name part_a   # in parallel with
    python benchmarks/hyperadalora_convergence.py --seeds 1 2 --only HyperLoRA --name part_b      # another part, then
    python benchmarks/hyperadalora_convergence.py --merge benchmarks/results/part_a.json benchmarks/results/part_b.json
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from common import quiet_cpu_trainer, reproduce_command, write_results  # noqa: E402
from lora_lightning.adapters.hyper_diagnostics import generator_diagnostics  # noqa: E402
from lora_lightning.callbacks.nonfinite import NonFiniteTrainingError  # noqa: E402
from lora_lightning.data import CausalLMDataModule, TextClassificationDataModule  # noqa: E402
from lora_lightning.modules import AdaLoRAModule, LoRAModule  # noqa: E402
from lora_lightning.modules.hyperadalora import HyperAdaLoRAModule, HyperLoRAModule  # noqa: E402

TASKS = {  # backbone, task, adapted modules, validation metric, whether higher is better, default target fraction
    "minilm-rt": dict(backbone="minilm", task="sequence-classification", targets=["query", "key", "value", "dense"],
                      metric="val/accuracy", higher=True, target_frac=0.95),
    "smollm2-hamlet": dict(backbone="smollm2", task="causal-lm", targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                           metric="val/perplexity", higher=False, target_frac=1.05),
}


def contenders(args) -> dict[str, tuple[type, dict]]:
    """Name → (module class, constructor arguments); each contender at ``args.contender_lr[name]`` if given, else
    at ``--lr`` (AdaLoRA family) or ``--lora-lr`` (LoRA family)."""
    spec = TASKS[getattr(args, "task", "minilm-rt")]  # results written before --task ran MiniLM
    lora_lr = args.lora_lr or args.lr  # results written before --lora-lr existed have None
    common = dict(backbone=spec["backbone"], target_modules=spec["targets"], warmup_ratio=0.06)
    if spec["task"] != "sequence-classification":
        common["task"] = spec["task"]

    def ada(lr: float) -> dict:
        return dict(common, learning_rate=lr, init_r=args.init_r, target_r=args.target_r, alpha=args.alpha,
                    orth_reg_weight=0.1, tinit=0.1, tfinal=0.2, delta_t=10)

    def lora(lr: float) -> dict:
        return dict(common, learning_rate=lr, rank=args.target_r, alpha=args.alpha)

    def hyper(base, mode: str = "residual", **options):
        return lambda lr: dict(base(lr), hypernet_lr=args.hypernet_lr_ratio * lr,
                               hypernet_warmup=args.hypernet_warmup, mode=mode, **options)

    frontload_ratio = getattr(args, "frontload_ratio", 1.0)

    def frontload(**options):  # generator LR frontload_ratio × lr at the start, 0 and folded at tinit
        return lambda lr: dict(hyper(ada, **options)(lr), hypernet_lr=frontload_ratio * lr, hypernet_warmup=0,
                               hypernet_fold_at=0.1)

    def boosted(lr: float) -> dict:  # the control: the same extra early LR on Λ alone
        return dict(ada(lr), lambda_lr_boost=frontload_ratio, lambda_boost_steps=0.1)

    builders = {
        "LoRA": (LoRAModule, lora, lora_lr),
        "AdaLoRA": (AdaLoRAModule, ada, args.lr),
        "HyperAdaLoRA-residual": (HyperAdaLoRAModule, hyper(ada), args.lr),
        "HyperAdaLoRA-recurrent": (HyperAdaLoRAModule, hyper(ada, "recurrent"), args.lr),
        "HyperAdaLoRA-seeded": (HyperAdaLoRAModule, hyper(ada, "seeded"), args.lr),
        "HyperAdaLoRA-triplet": (HyperAdaLoRAModule, hyper(ada, hypernet_tokens="triplet"), args.lr),
        "HyperAdaLoRA-gains": (HyperAdaLoRAModule, hyper(ada, hypernet_scaling="gains"), args.lr),
        "HyperAdaLoRA-gradrms": (HyperAdaLoRAModule, hyper(ada, hypernet_scaling="grad_rms"), args.lr),
        "HyperAdaLoRA-triplet-gradrms": (HyperAdaLoRAModule,
                                         hyper(ada, hypernet_tokens="triplet", hypernet_scaling="grad_rms"), args.lr),
        "HyperAdaLoRA-frontload": (HyperAdaLoRAModule, frontload(), args.lr),
        "HyperAdaLoRA-triplet-frontload": (HyperAdaLoRAModule, frontload(hypernet_tokens="triplet"), args.lr),
        "AdaLoRA-lambda-boost": (AdaLoRAModule, boosted, args.lr),
        "HyperLoRA": (HyperLoRAModule, hyper(lora), lora_lr),
        "HyperLoRA-gradrms": (HyperLoRAModule, hyper(lora, hypernet_scaling="grad_rms"), lora_lr),
        "HyperLoRA-triplet": (HyperLoRAModule, hyper(lora, hypernet_tokens="triplet"), lora_lr),
    }
    lrs = getattr(args, "contender_lr", None) or {}
    return {name: (cls, build(lrs.get(name, default))) for name, (cls, build, default) in builders.items()
            if not args.only or name in args.only}


class Recorder(Callback):
    """Validation accuracy per step, training time per optimiser step (validation excluded)."""

    def __init__(self, metric: str = "val/accuracy") -> None:
        self.metric = metric
        self.curve: list[tuple[int, float, float]] = []  # (step, metric, training seconds so far)
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
        value = float(trainer.callback_metrics[self.metric])
        self.curve.append((trainer.global_step, value, sum(self.step_times)))


def datamodule(max_length: int, batch_size: int, val_samples: int, task: str = "minilm-rt"):
    """The task's data, set up: the same validation subset (data seed 42) for every run."""
    if task == "smollm2-hamlet":
        dm = CausalLMDataModule(backbone="smollm2", source="hamlet", block_size=max_length, batch_size=batch_size,
                                eval_batch_size=batch_size, max_eval_samples=val_samples, seed=42)
    else:
        dm = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=max_length,
                                          batch_size=batch_size, eval_batch_size=100, max_eval_samples=val_samples,
                                          seed=42)
    dm.setup("fit")
    return dm


def draw_batches(args, seed: int):
    dm = datamodule(args.max_length, args.batch_size, args.val_samples, args.task)
    torch.manual_seed(1000 + seed)
    train, it = [], iter(dm.train_dataloader())
    while len(train) < args.steps:
        try:
            train.append(next(it))
        except StopIteration:
            it = iter(dm.train_dataloader())
    return train, list(dm.val_dataloader())


def run_one(cls, kwargs, train, val, args, seed: int) -> dict:
    """One fit; a run stopped by a non-finite loss keeps its curve and ends with a NaN point (``diverged``)."""
    L.seed_everything(seed, workers=True, verbose=False)
    model = cls(**kwargs)
    recorder = Recorder(TASKS[args.task]["metric"])
    with quiet_cpu_trainer(max_steps=args.steps, val_check_interval=args.val_every, callbacks=[recorder]) as trainer:
        diverged = False
        try:
            trainer.fit(model, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
        except NonFiniteTrainingError:
            diverged = True
            recorder.curve.append((trainer.global_step, math.nan, sum(recorder.step_times)))
    times = recorder.step_times[2:] or recorder.step_times or [math.nan]  # first steps: lazy init
    return {"curve": recorder.curve, "step_times": times, "diverged": diverged}


def final_value(result: dict) -> float:
    return result["curve"][-1][1] if result["curve"] else math.nan


def better(a: float, b: float, higher: bool) -> bool:
    """Whether metric value ``a`` beats ``b`` (NaN never does)."""
    return not math.isnan(a) and (math.isnan(b) or (a > b if higher else a < b))


@functools.lru_cache
def majority(max_length: int, batch_size: int, val_samples: int) -> float:
    """Accuracy of always predicting the most frequent label of the validation subset (the floor); computed once
    per data setting, not at every report."""
    dm = datamodule(max_length, batch_size, val_samples)
    labels = torch.cat([b["labels"] for b in dm.val_dataloader()])
    return float(torch.bincount(labels).max()) / len(labels)


def first_reaching(curve, target: float, higher: bool = True):
    for step, value, seconds in curve:
        if (value >= target) if higher else (value <= target):
            return step, seconds
    return None, None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="minilm-rt",
                        help="minilm-rt: MiniLM on Rotten Tomatoes (accuracy); smollm2-hamlet: SmolLM2 on Hamlet "
                             "(perplexity; the committed results: --batch-size 4 --max-length 64)")
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
    parser.add_argument("--frontload-ratio", type=float, default=1.0,
                        help="-frontload contenders: generator LR = this × lr at the start, decaying to 0 (and "
                             "folded) at tinit; AdaLoRA-lambda-boost: Λ's LR × (1 + this) decaying alike")
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-frac", type=float, default=None,
                        help="target = this × AdaLoRA's median final metric (default: 0.95 for accuracy, 1.05 for "
                             "perplexity)")
    parser.add_argument("--target-acc", type=float, default=None,
                        help="an absolute target metric instead of --target-frac × the reference's final metric")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON[:NAME,...]",
                        help="combine result JSONs of runs over disjoint seeds or contenders (run in parallel) into "
                             "one report; ':NAME,...' takes only those contenders from a file")
    parser.add_argument("--step-time", type=int, default=0, metavar="ROUNDS",
                        help="instead: time training steps of every contender round-robin (common.interleaved_times)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fits at a time, in worker processes of one thread each (2 on a 2-core machine)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None, metavar="LR",
                        help="instead: every contender at each of these learning rates on the first seed; writes "
                             "<name>_lr_grid.{json,md} with each contender's best (by final metric)")
    parser.add_argument("--lrs-from", type=Path, nargs="+", default=None, metavar="JSON",
                        help="each contender's learning rate from --lr-grid result files (a grid split by --only)")
    parser.add_argument("--diagnose", action="store_true",
                        help="instead: step-0 diagnostics of every generator-based contender (token-specific share "
                             "of the encoder input, gradient energy in the feature span vs a random span)")
    parser.add_argument("--diagnose-batches", type=int, default=8)
    parser.add_argument("--name", default="hyperadalora_convergence")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parsed, with the task's default target fraction and each contender's learning rate resolved (so result
    files hold them)."""
    import json

    args = build_parser().parse_args(argv)
    if args.target_frac is None:
        args.target_frac = TASKS[args.task]["target_frac"]
    grids = [json.loads(path.read_text()) for path in args.lrs_from or ()]
    args.contender_lr = {name: lr for grid in grids for name, lr in grid["best_lr"].items()} or None
    args.lrs_from = [str(path) for path in args.lrs_from] if args.lrs_from else None
    args.grid_runs = {(grid["args"]["seeds"][0], name): grid["runs"][name][f"{lr:g}"]
                      for grid in grids if same_runs(grid["args"], vars(args))
                      for name, lr in grid["best_lr"].items() if f"{lr:g}" in grid.get("runs", {}).get(name, {})}
    return args


RUN_KEYS = ("task", "steps", "val_every", "val_samples", "batch_size", "max_length", "init_r", "target_r", "alpha",
            "hypernet_lr_ratio", "hypernet_warmup", "frontload_ratio")


def recorded(args) -> dict:
    """The arguments a result file records (the reused grid runs are in the grid file, not repeated; a merged
    file's parts are not kept: its command computes it in one process)."""
    return {key: value for key, value in vars(args).items() if key not in ("grid_runs", "merge")}


def same_runs(a: dict, b: dict) -> bool:
    """Whether two argument sets give a contender the same fit (the learning rate aside): a grid run at a
    contender's chosen rate then stands for that seed's run."""
    return all(a.get(key) == b.get(key) for key in RUN_KEYS)


def main(argv=None) -> None:
    args = parse_args(argv)
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
    if args.diagnose:
        diagnose(args)
        return
    if args.lr_grid:
        lr_grid(args)
        return
    table = contenders(args)
    data = {seed: draw_batches(args, seed) for seed in args.seeds}  # same batches for every contender of a seed
    jobs = [((seed, name), cls, kwargs, seed) for seed in args.seeds for name, (cls, kwargs) in table.items()
            if (seed, name) not in args.grid_runs]
    results = {key: result for key, result in args.grid_runs.items() if key[0] in data and key[1] in table}
    reported = 0

    def report_complete_seeds() -> None:
        """Report the seeds, in order, with every contender done, as soon as there are more of them."""
        nonlocal reported
        complete = 0
        while complete < len(args.seeds) and all((args.seeds[complete], n) in results for n in table):
            complete += 1
        if complete > reported:
            reported = complete
            report({n: [results[s, n] for s in args.seeds[:complete]] for n in table}, args, args.seeds[:complete])

    report_complete_seeds()  # seeds whose every run is the grid's (nothing to fit) are reported too
    for (seed, name), result in fit_all(jobs, data, args):
        results[seed, name] = result
        print(f"seed {seed} {name}: final {TASKS[args.task]['metric']} {final_value(result):.4f}, "
              f"{statistics.median(result['step_times']) * 1e3:.0f} ms/step", flush=True)
        report_complete_seeds()


def _worker_init() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def fit_all(jobs: list, data: dict, args) -> Iterator[tuple[Any, dict]]:
    """``(key, result)`` of every job ``(key, class, kwargs, seed)`` as it finishes. With ``--jobs N`` > 1, N fits
    run at a time in worker processes (spawned, one torch thread each: contenders of a 2-core machine use both
    cores without sharing one); the fits are the same as in one process."""
    if args.jobs <= 1:
        for key, cls, kwargs, seed in jobs:
            yield key, run_one(cls, kwargs, *data[seed], args, seed)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(run_one, cls, kwargs, *data[seed], args, seed): key for key, cls, kwargs, seed in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


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
    write_results(f"{args.name}_step_time", {"args": recorded(args), "results": payload}, markdown)


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
    """Combine result files; refuses contenders whose settings differ between files (other lr, ratio, ...).
    Files of an ``--lr-grid`` run split by ``--only`` or by rate combine into one grid file."""
    import json

    grids = [json.loads(Path(spec.partition(":")[0]).read_text()) for spec in args.merge]  # PATH[:NAME,...]
    if all("best_lr" in grid for grid in grids):  # parts of one --lr-grid run, split by --only or by rate
        for path, grid in zip(args.merge, grids):
            if not same_runs(grid["args"], grids[0]["args"]) or grid["args"]["seeds"][:1] != grids[0]["args"]["seeds"][:1]:
                raise SystemExit(f"{path} ran other settings than {args.merge[0]}: not parts of one grid.")
        for key in (*RUN_KEYS, "seeds", "target_frac"):
            setattr(args, key, grids[0]["args"].get(key))
        runs: dict[str, dict[str, dict]] = {}
        for grid in grids:
            for name, by_lr in grid["runs"].items():
                runs.setdefault(name, {}).update(by_lr)
        args.lr_grid = sorted({float(lr) for by_lr in runs.values() for lr in by_lr})  # the rates a part finished
        command = one_process_command(args, lr_grid=args.lr_grid, seeds=args.seeds[:1], only=contenders_of(runs),
                                      jobs=[2])
        write_lr_grid(args, {name: dict(sorted(by_lr.items(), key=lambda item: float(item[0])))
                             for name, by_lr in runs.items()}, command)
        return
    runs: dict[str, list[dict]] = {}
    settings: dict[str, dict] = {}
    seeds, grid_files = [], []
    for spec in args.merge:
        path, _, names = spec.partition(":")
        data = json.loads(Path(path).read_text())
        wanted = names.split(",") if names else list(data["results"])
        missing = [n for n in wanted if n not in data["results"]]
        if missing:
            raise SystemExit(f"{path} has no results for {missing}; it has {list(data['results'])}.")
        seeds += data.get("seeds_done") or data["args"]["seeds"]
        for name in wanted:
            these = data["results"][name].get("settings") or contender_settings(data["args"], name)  # as recorded
            if settings.setdefault(name, these) != these:
                raise SystemExit(f"{name} in {path} ran with {these}, elsewhere with {settings[name]}: not mergeable.")
            row = data["results"][name]
            per_seed = row.get("step_ms_per_seed") or [row["step_ms"]] * len(row["curves"])
            for curve, ms in zip(row["curves"], per_seed):
                runs.setdefault(name, []).append({"curve": [tuple(c) for c in curve], "step_times": [ms / 1e3]})
        for key in ("steps", "val_every", "val_samples", "batch_size", "max_length", "target_frac"):
            setattr(args, key, data["args"][key])
        args.task = data["args"].get("task", "minilm-rt")
        grid_files += data["args"].get("lrs_from") or []
    args.seeds = sorted(set(seeds))  # files may split one seed's contenders
    args.lrs_from = sorted(set(grid_files)) or None
    command = one_process_command(args, lrs_from=args.lrs_from, seeds=args.seeds, only=contenders_of(runs),
                                  jobs=[2])
    report(runs, args, args.seeds, settings, command)


def contenders_of(runs: dict) -> list[str]:
    """The contenders present in ``runs``, in the benchmark's order."""
    every = contenders(argparse.Namespace(**{**vars(build_parser().parse_args([])), "only": None}))
    return [name for name in every if name in runs]


def one_process_command(args, **options) -> str:
    """The command that computes a merged result in one process (its parts ran split over processes, by contender,
    seed or rate): the run settings that differ from the defaults, then ``options`` (option → list of values), then
    the merged file's ``--name``, so that the command rewrites that file and no other."""
    defaults = vars(build_parser().parse_args([]))

    def text(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    argv = [__file__]
    for key in (*RUN_KEYS, "target_frac"):
        value = getattr(args, key, None)
        if value is not None and value != defaults[key] and not (key == "target_frac" and value == TASKS[args.task][key]):
            argv += [f"--{key.replace('_', '-')}", text(value)]
    for key, values in options.items():
        if values:
            argv += [f"--{key.replace('_', '-')}", *map(text, values)]
    if args.name != defaults["name"]:
        argv += ["--name", args.name]
    return reproduce_command(argv)


def report(runs, args, seeds, settings: dict[str, dict] | None = None, command: str | None = None) -> None:
    if settings is None:
        settings = {name: {"class": cls.__name__, **kwargs} for name, (cls, kwargs) in contenders(args).items()}
    spec = TASKS[args.task]
    metric, higher = spec["metric"].removeprefix("val/"), spec["higher"]
    reference = "AdaLoRA" if "AdaLoRA" in runs else next(iter(runs))
    ref_final = med([final_value(r) for r in runs[reference]])
    target = args.target_acc if args.target_acc is not None else args.target_frac * ref_final
    rows = {}
    for name, results in runs.items():
        reach = [first_reaching(r["curve"], target, higher) for r in results]
        finals = [final_value(r) for r in results]
        rows[name] = {
            "final": med(finals),
            "final_per_seed": finals,
            "best": med([(max if higher else min)(v for _, v, _ in r["curve"]) for r in results if r["curve"]]),
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
        row["final_delta"] = row["final"] - ref["final"]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    floor = (f"Validation majority-class accuracy: {majority(args.max_length, args.batch_size, args.val_samples):.4f}. "
             if args.task == "minilm-rt" else "")
    lines = [
        (f"Target: {metric} {target:.4f} (absolute). " if args.target_acc is not None else
         f"Target: {args.target_frac:g} × {reference}'s median final {metric} = {target:.4f}. ") + floor +
        f"{len(seeds)} seeds ({seeds}), {args.steps} steps, batch {args.batch_size}, seq {args.max_length}, "
        f"validation on {args.val_samples} examples every {args.val_every} steps. Medians over seeds.",
        "",
        f"| method | lr (hypernet) | final {metric} | Δ vs AdaLoRA | steps to target | × AdaLoRA | s to target "
        "| × AdaLoRA | ms/step | × AdaLoRA | seeds reaching |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        hyper_lr = settings[name].get("hypernet_lr")
        lrs = f"{settings[name]['learning_rate']:g}" + (f" ({hyper_lr:g})" if hyper_lr is not None else "")
        lines.append(
            f"| {name} | {lrs} | {r['final']:.4f} | {r['final_delta']:+.4f} "
            f"| {fmt(r['steps_to_target'], '.0f')} "
            f"| {fmt(r['steps_ratio'], '.2f')} | {fmt(r['seconds_to_target'], '.1f')} | {fmt(r['time_ratio'], '.2f')} "
            f"| {r['step_ms']:.0f} | {r['step_time_ratio']:.2f} | {r['reached']}/{r['seeds']} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    for name, row in rows.items():
        row["settings"] = settings[name]
    payload = {"args": recorded(args), "seeds_done": seeds, "metric": spec["metric"], "target": target,
               "reference": reference, "results": rows}
    write_results(args.name, payload, markdown, command)
    plot(rows, target, Path(__file__).resolve().parent / "results" / f"{args.name}.png", args.task)


def lr_grid(args) -> None:
    """Every contender at every ``--lr-grid`` rate on the first seed (same batches); the best rate per contender by
    final metric (a diverged run never wins) goes to ``<name>_lr_grid.json`` for ``--lrs-from``, rewritten after
    every run (an interrupted grid keeps what it measured)."""
    seed = args.seeds[0]
    data = {seed: draw_batches(args, seed)}
    jobs = []
    for lr in args.lr_grid:
        at_lr = argparse.Namespace(**{**vars(args), "contender_lr": None, "lr": lr, "lora_lr": lr})
        jobs += [((name, f"{lr:g}"), cls, kwargs, seed) for name, (cls, kwargs) in contenders(at_lr).items()]
    runs: dict[str, dict[str, dict]] = {}
    for (name, lr), result in fit_all(jobs, data, args):
        runs.setdefault(name, {})[lr] = result
        print(f"lr {lr} {name}: final {TASKS[args.task]['metric']} {final_value(result):.4f}", flush=True)
        write_lr_grid(args, runs)


def write_lr_grid(args, runs: dict[str, dict[str, dict]], command: str | None = None) -> None:
    """The grid table and each contender's best rate (``best_lr``, read by ``--lrs-from``, which also reuses the
    run at that rate as the seed's run: ``runs`` holds every run's curve)."""
    finals = {name: {lr: final_value(result) for lr, result in by_lr.items()} for name, by_lr in runs.items()}
    spec = TASKS[args.task]
    best = {}
    for name, by_lr in finals.items():
        winner = None
        for lr, value in by_lr.items():
            if winner is None or better(value, by_lr[winner], spec["higher"]):
                winner = lr
        best[name] = float(winner)
    header = " | ".join(f"{lr:g}" for lr in args.lr_grid)
    reference = runs.get("AdaLoRA", {}).get(f"{best.get('AdaLoRA', 0):g}")
    target = None if reference is None else args.target_frac * final_value(reference)
    lines = [f"Final {spec['metric']} after {args.steps} steps, seed {args.seeds[0]}, per learning rate "
             "(NaN: diverged; –: not run). Steps to target: the first validation (every "
             f"{args.val_every} steps) of the best-lr run at {args.target_frac:g} × AdaLoRA's best final "
             + ("(no AdaLoRA run yet)." if target is None else f"= {target:.4f}."), "",
             f"| method | {header} | best lr | steps to target |", "|---" * (len(args.lr_grid) + 3) + "|"]
    for name, by_lr in finals.items():
        cells = [f"{by_lr[f'{lr:g}']:.4f}" if f"{lr:g}" in by_lr else "–" for lr in args.lr_grid]
        steps = None if target is None else first_reaching(runs[name][f"{best[name]:g}"]["curve"], target,
                                                           spec["higher"])[0]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best[name]:g} | {'n/a' if steps is None else steps} |")
    markdown = "\n".join(lines)
    print(markdown, flush=True)
    write_results(f"{args.name}_lr_grid", {"args": recorded(args), "final": finals, "best_lr": best, "runs": runs},
                  markdown, command)


def diagnose(args) -> None:
    """Step 0 of every generator-based contender on ``--diagnose-batches`` training batches of seed 0: per
    generator, the token-specific share of its encoder input and the share of ∂L/∂(generated factor) inside its
    feature span vs a random span of the same size (adapters/hyper_diagnostics.py)."""
    train, _ = draw_batches(argparse.Namespace(**{**vars(args), "steps": args.diagnose_batches}), 0)
    lines = ["| method | factor | token-specific share | within-matrix share | gradient in feature span "
             "| in a random span (expected) |", "|---|---|---|---|---|---|"]
    payload = {}
    for name, (cls, kwargs) in contenders(args).items():
        if not issubclass(cls, (HyperAdaLoRAModule, HyperLoRAModule)):
            continue
        L.seed_everything(0, verbose=False)
        module = cls(**kwargs)
        for batch in train:  # gradients of the generated factors accumulate until a step
            module.task.loss(module(batch), batch).backward()
        payload[name] = generator_diagnostics(module.hypernet)
        for fname, d in payload[name].items():
            span, random = ("n/a (zero gradient)", "n/a") if d["span_share"] is None else (
                f"{d['span_share']:.4f}", f"{d['random_share']:.4f}")
            lines.append(f"| {name} | {fname} | {d['token_share']:.4f} | {d['within_matrix_share']:.4f} "
                         f"| {span} | {random} |")
    markdown = (f"Generator diagnostics at step 0, {args.task}, {args.diagnose_batches} batches of "
                f"{args.batch_size} (seed 0's training batches).\n\n" + "\n".join(lines))
    print(markdown)
    write_results(f"{args.name}_diagnostics", {"args": recorded(args), "results": payload}, markdown)


PLOT_TOP_OVER_TARGET = 2.0


def plot(rows, target, path: Path, task: str = "minilm-rt") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in rows.items():
        curves = [c for c in row["curves"] if c]
        length = min(len(c) for c in curves)  # a diverged seed ends early
        steps = [s for s, _, _ in curves[0][:length]]
        values = [[c[i][1] for c in curves] for i in range(length)]
        line, = ax.plot(steps, [statistics.median(v) for v in values], marker="o", ms=3, label=name)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.12)
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"validation {TASKS[task]['metric'].removeprefix('val/')} (median, min–max over seeds)")
    title = {"minilm-rt": "MiniLM on Rotten Tomatoes", "smollm2-hamlet": "SmolLM2 on Hamlet"}[task]
    if not TASKS[task]["higher"]:  # a perplexity spike (hundreds) would flatten every curve near the target
        ax.set_ylim(bottom=0.9 * min(ax.dataLim.y0, target), top=PLOT_TOP_OVER_TARGET * target)
        title += f" (axis cut at {PLOT_TOP_OVER_TARGET:g} × target)"
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
