"""Training step time and peak memory of AdaLoRA: ours against PEFT's AdaLoRA and against our LoRA at rank init_r.

What is measured
    One training step = forward + loss (task loss + orthogonal penalty for AdaLoRA) + backward + ``AdamW.step()`` +
    the rank allocation + ``zero_grad()``, on the raw torch modules (no Trainer), MiniLM, batch 16, seq 64, real
    Rotten Tomatoes batches (``benchmarks/step_time.py``'s ``make_batches``), targets query/key/value/dense.

Contenders (same packaged weights, same batches, same seed)
    * ours-adalora -- :class:`AdaLoRAModule` (init_r 12 → target_r 8, α 24, orth_reg_weight 0.5) with
      :meth:`RankPruningScheduler.allocate` called after every optimiser step, as the callback does in a Trainer.
    * peft-adalora -- ``peft`` ``AdaLoraConfig`` with the same ranks, α and penalty; its ``update_and_allocate`` is
      called after every optimiser step (what PEFT asks users to do). Our initial P, Λ, Q and head are copied in,
      so the first step computes the same loss (reported as a check).
    * ours-lora -- :class:`LoRAModule` at rank ``init_r`` (12), α 16.

    Both AdaLoRA contenders run the same schedule: no warm-up (``tinit = 0``), a masking event every step
    (``delta_t = 1``) over a long run (``total_step = 10_000``), i.e. the allocator's worst case every step.

Timing and memory as ``benchmarks/step_time.py`` (interleaved round-robin, median; CPU time per step as well;
peak RSS of a fresh subprocess per contender, reset after loading).

Usage (from the repository root)::

    python benchmarks/adalora_step_time.py --steps 20 --warmup 3

Writes ``benchmarks/results/adalora_step_time.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import (  # noqa: E402
    environment,
    interleaved_times,
    load_average,
    markdown_table,
    paired_ratio,
    peak_rss_mb,
    probe_in_subprocess,
    reproduce_command,
    reset_peak_rss,
    rss_mb,
    summarize,
    write_results,
)
from benchmarks.step_time import SETUPS, make_batches  # noqa: E402
from lora_lightning.adapters.base import unload_adapters  # noqa: E402
from lora_lightning.callbacks import RankPruningScheduler  # noqa: E402
from lora_lightning.modules import AdaLoRAModule, LoRAModule  # noqa: E402

SEED, LR = 0, 5e-4
INIT_R, TARGET_R, ALPHA, ORTH = 12, 8, 24.0, 0.5
TOTAL_STEP = 10_000
CONTENDERS = ("ours-adalora", "peft-adalora", "ours-lora")
LABELS = {"ours-adalora": "lora-lightning AdaLoRA", "peft-adalora": "PEFT AdaLoRA (update_and_allocate every step)",
          "ours-lora": f"lora-lightning LoRA r={INIT_R}"}
SETUP = SETUPS["minilm"]
TARGETS = list(SETUP.target_modules)


def build(names) -> dict[str, tuple[nn.Module, callable]]:
    """name -> (model, step_fn factory inputs)."""
    torch.manual_seed(SEED)
    out = {}
    ada = AdaLoRAModule(backbone="minilm", num_labels=2, target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R,
                        alpha=ALPHA, orth_reg_weight=ORTH, total_step=TOTAL_STEP)
    if "ours-adalora" in names:
        out["ours-adalora"] = ada
    if "peft-adalora" in names:
        from peft import AdaLoraConfig, get_peft_model

        import copy

        base = unload_adapters(copy.deepcopy(ada.backbone), merge=False)
        config = AdaLoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, init_r=INIT_R, target_r=TARGET_R,
                               lora_alpha=ALPHA * (INIT_R + 1e-5) / INIT_R, lora_dropout=0.0, orth_reg_weight=ORTH,
                               tinit=0, tfinal=0, deltaT=1, total_step=TOTAL_STEP)
        peft_model = get_peft_model(base, config)
        inner = peft_model.base_model.model
        with torch.no_grad():
            for name, layer in ada.adapters.items():
                target = inner.get_submodule(name)
                target.lora_A["default"].copy_(layer.lora_Q)
                target.lora_B["default"].copy_(layer.lora_P)
                target.lora_E["default"].copy_(layer.lora_lambda.unsqueeze(1))
        out["peft-adalora"] = peft_model
    if "ours-lora" in names:
        torch.manual_seed(SEED)
        out["ours-lora"] = LoRAModule(backbone="minilm", num_labels=2, target_modules=TARGETS, rank=INIT_R,
                                      alpha=16.0)
    for model in out.values():
        model.train()
    return out


def make_step(name: str, model: nn.Module, batches, losses: list[float]):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    if name == "ours-adalora":
        scheduler = RankPruningScheduler(tinit=0, tfinal=0, delta_t=1)
        units = model.rank_units()
        scheduler.target_r = TARGET_R
        scheduler.schedule = scheduler.build_schedule(units, TOTAL_STEP, TARGET_R)

    def step(i: int) -> None:
        torch.manual_seed(SEED + i)
        batch = batches[i % len(batches)]
        if name == "peft-adalora":
            loss = model(**batch).loss  # PEFT adds the orthogonal penalty inside forward
        else:
            loss = model.task.loss(model(batch), batch)
            extra = model.extra_losses()
            if extra:
                loss = loss + sum(extra.values())
        loss.backward()
        optimizer.step()
        if name == "ours-adalora":
            scheduler.allocate(model, i + 1)
        elif name == "peft-adalora":
            model.base_model.update_and_allocate(i + 1)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


def probe(name: str, steps: int) -> dict:
    model = build((name,))[name]
    batches = make_batches(SETUP, steps)
    step = make_step(name, model, batches, [])
    reset = reset_peak_rss()
    before = rss_mb()
    for i in range(steps):
        step(i)
    peak = peak_rss_mb()
    return {"rss_before_step_mb": before, "peak_rss_mb": peak, "delta_step_mb": peak - before, "peak_reset": reset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--probe-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.probe:
        print(json.dumps(probe(args.probe, args.probe_steps)))
        return

    command = reproduce_command()
    models = build(CONTENDERS)
    batches = make_batches(SETUP, args.warmup + args.steps)
    losses = {name: [] for name in models}
    steps = {name: make_step(name, models[name], batches, losses[name]) for name in CONTENDERS}
    load_before = load_average()
    cpu_times: dict[str, list[float]] = {}
    times = interleaved_times(steps, steps=args.steps, warmup=args.warmup, cpu_times=cpu_times)
    load_after = load_average()
    first_loss_diff = abs(losses["ours-adalora"][0] - losses["peft-adalora"][0])
    counts = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    del models, steps
    memory = {n: probe_in_subprocess([str(Path(__file__).resolve()), "--probe", n, "--probe-steps",
                                      str(args.probe_steps), "--threads", str(threads)]) for n in CONTENDERS}
    stats = {n: summarize(t) for n, t in times.items()}
    cpu = {n: summarize(t) for n, t in cpu_times.items()}
    contenders = {}
    for n in CONTENDERS:
        contenders[n] = {
            "label": LABELS[n], "trainable_params": counts[n], **stats[n],
            "ratio_vs_peft_adalora": stats[n]["median_ms"] / stats["peft-adalora"]["median_ms"],
            "ratio_vs_ours_lora": stats[n]["median_ms"] / stats["ours-lora"]["median_ms"],
            "paired_ratio_vs_peft_adalora": paired_ratio(times[n], times["peft-adalora"]),
            "paired_ratio_vs_ours_lora": paired_ratio(times[n], times["ours-lora"]),
            "cpu": {**cpu[n], "ratio_vs_peft_adalora": cpu[n]["median_ms"] / cpu["peft-adalora"]["median_ms"],
                    "ratio_vs_ours_lora": cpu[n]["median_ms"] / cpu["ours-lora"]["median_ms"]},
            "memory": memory[n], "times_ms": [t * 1e3 for t in times[n]],
            "cpu_times_ms": [t * 1e3 for t in cpu_times[n]], "losses": losses[n],
        }
    rows = [[c["label"], f"{c['trainable_params']:,}", c["median_ms"], f"{c['p25_ms']:.0f}–{c['p75_ms']:.0f}",
             f"{c['paired_ratio_vs_peft_adalora']:.2f}", f"{c['paired_ratio_vs_ours_lora']:.2f}", c["cpu"]["median_ms"],
             f"{c['cpu']['ratio_vs_peft_adalora']:.2f}", f"{c['cpu']['ratio_vs_ours_lora']:.2f}",
             c["memory"]["peak_rss_mb"], c["memory"]["delta_step_mb"]] for c in contenders.values()]
    headers = ["contender", "trainable params", "median step ms", "IQR ms", "ratio vs PEFT AdaLoRA",
               "ratio vs our LoRA", "median CPU ms", "CPU ratio vs PEFT AdaLoRA", "CPU ratio vs our LoRA",
               "peak RSS MB", "Δ step MB"]
    markdown = "\n".join([
        "# AdaLoRA training step time and peak memory: ours vs PEFT AdaLoRA vs our LoRA",
        "",
        f"MiniLM, batch {SETUP.batch_size}, seq {SETUP.seq_len}, targets {', '.join(TARGETS)}; init_r {INIT_R} → "
        f"target_r {TARGET_R}, α {ALPHA:g}, orth_reg_weight {ORTH}; a masking event every step (tinit 0, delta_t 1). "
        f"Median over {args.steps} timed steps after {args.warmup} warm-up steps, interleaved round-robin, "
        f"{threads} torch thread(s), CPU, torch {torch.__version__}; ratios are medians of per-round ratios. Load "
        f"average before / after: {load_before} / {load_after}. Peak memory: fresh subprocess per contender.",
        "",
        markdown_table(headers, rows, align="lrrrrrrrrrr"),
        "",
        f"Check: first-step loss ours vs PEFT AdaLoRA (same initial weights and batch): |Δ| = {first_loss_diff:.2e}.",
        "",
        "Targets from the issue: ≤ 0.85× PEFT AdaLoRA's step time, ≤ 1.05× our LoRA's, peak memory ≤ PEFT's.",
    ])
    print(markdown)
    write_results("adalora_step_time", {"environment": environment(threads), "settings": vars(args),
                                        "first_step_loss_abs_diff": first_loss_diff, "contenders": contenders},
                  markdown, command)


if __name__ == "__main__":
    main()
