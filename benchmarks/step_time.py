"""Training step time and peak memory: the frozen-backbone floor, our LoRA, and PEFT's LoRA, side by side.

What is measured
    One training step = forward + loss + backward + ``AdamW.step()`` + ``zero_grad()``, called on the raw torch
    modules (no Lightning Trainer), so the adapter layers themselves are timed. Ours is called as
    ``LoRAModule(...).backbone(**batch)``, PEFT's as ``peft_model(**batch)``: the same call with the same
    keyword batch, the loss taken from ``outputs.loss``.

Contenders (per backbone, same packaged pretrained weights, same batches, same seed)
    * floor -- MiniLM: the frozen backbone with only the classification head trainable (what any adapter
      method must at least pay). SmolLM2: "frozen forward", the forward pass and loss of the frozen model with no
      trainable parameter at all (autograd records nothing, so there is no backward and no optimiser step).
    * ours -- :class:`lora_lightning.modules.LoRAModule` (rank 8, alpha 16, dropout 0).
    * peft -- ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0, same targets)`` on a
      copy of the same backbone, with our initial A, B (and classification head) copied in, so both compute the
      same function: their per-step losses are compared and reported as a correctness check.

    All three are in ``train()`` mode (the backbone's own dropout active). Before contender c's step i the torch
    seed is set to ``seed + i``, so every contender sees the same batch and the same dropout masks.

Timing
    Contenders run round-robin (floor, ours, peft, floor, ours, peft, ...) so drift on a shared machine affects
    all alike; ``--warmup`` rounds are discarded, then ``--steps`` rounds are timed with ``time.perf_counter``
    (garbage collector paused inside a timed step). Reported: the median step time, the ratio of medians against
    PEFT and against the floor (the JSON also holds the median of per-round paired ratios, quartiles and raw
    times). ``torch.set_num_threads`` is set to the number of CPUs this process may use.

Peak memory
    On CPU torch allocates tensors with plain ``malloc``: there is no caching allocator with peak statistics (as
    ``torch.cuda.max_memory_allocated``) and ``tracemalloc`` sees only Python objects, not tensor storage. So each
    contender's memory is probed in a *fresh subprocess* (this script with ``--probe``) that builds only that
    contender, resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``; this removes the
    loading peak, e.g. SmolLM2's GGUF dequantisation), notes the RSS of the loaded model, runs a few training
    steps, and reads the high-water mark (``VmHWM``). "peak RSS MB" is that high-water mark (process total:
    Python, libraries, weights, activations, gradients, optimiser state); "Δ step MB" is the peak minus the RSS
    before the first step: the memory the training step itself adds (activations saved for backward, gradients,
    AdamW state). Δ is the column to compare across contenders; the absolute peak also differs by how each
    contender was built (e.g. PEFT keeps a copy of the classification head in ``modules_to_save``).

Usage (from the repository root)::

    python benchmarks/step_time.py                        # both backbones, ~5 minutes on 2 CPU cores
    python benchmarks/step_time.py --only minilm --steps 30 --warmup 5

Writes ``benchmarks/results/step_time.json`` and ``benchmarks/results/step_time.md``.
"""
from __future__ import annotations

import argparse
import bz2
import copy
import csv
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
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
    RESULTS_DIR,
    reproduce_command,
    reset_peak_rss,
    rss_mb,
    summarize,
    write_results,
)
from lora_lightning.adapters.base import find_classifier_head, unload_adapters  # noqa: E402
from lora_lightning.assets import packaged_file  # noqa: E402
from lora_lightning.backbone import load_backbone, load_tokenizer  # noqa: E402
from lora_lightning.modules import LoRAModule  # noqa: E402

SEED = 0
RANK, ALPHA, LEARNING_RATE = 8, 16.0, 5e-4
CONTENDERS = ("floor", "ours", "peft")


@dataclass(frozen=True)
class Setup:
    alias: str
    task: str
    peft_task: str
    batch_size: int
    seq_len: int
    target_modules: tuple[str, ...]
    floor_label: str


SETUPS = {
    "minilm": Setup(
        "minilm", "sequence-classification", "SEQ_CLS", 16, 64, ("query", "key", "value", "dense"),
        "frozen backbone, head trained (floor)",
    ),
    "smollm2": Setup(
        "smollm2", "causal-lm", "CAUSAL_LM", 4, 128, ("q_proj", "k_proj", "v_proj", "o_proj"),
        "frozen forward (floor)",
    ),
}
LABELS = {"floor": None, "ours": "lora-lightning LoRAModule", "peft": "PEFT LoRA"}


# ----------------------------------------------------------------------------- data
def make_batches(setup: Setup, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of real text: Rotten Tomatoes snippets (classification) or Hamlet blocks (causal LM)."""
    tokenizer = load_tokenizer(setup.alias)
    rng = random.Random(SEED)
    if setup.task == "sequence-classification":
        with bz2.open(packaged_file("rotten_tomatoes"), "rt", encoding="utf-8") as handle:
            rows = [row for row in csv.DictReader(handle) if row["category"] != "plot"]
        rng.shuffle(rows)
        batches = []
        for b in range(count):
            chunk = [rows[(b * setup.batch_size + j) % len(rows)] for j in range(setup.batch_size)]
            encoded = tokenizer(
                [row["text"] for row in chunk], padding="max_length", truncation=True,
                max_length=setup.seq_len, return_tensors="pt",
            )
            encoded = dict(encoded)
            encoded["labels"] = torch.tensor([int(row["category"] == "fresh") for row in chunk])
            batches.append(encoded)
        return batches
    text = packaged_file("hamlet").read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    blocks = ids[: len(ids) // setup.seq_len * setup.seq_len].view(-1, setup.seq_len)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    batches = []
    for b in range(count):
        picked = [order[(b * setup.batch_size + j) % len(order)] for j in range(setup.batch_size)]
        input_ids = blocks[picked].clone()
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids})
    return batches


# ----------------------------------------------------------------------------- contenders
def _peft_model(setup: Setup, base: nn.Module, ours: nn.Module | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=setup.peft_task, target_modules=list(setup.target_modules), r=RANK, lora_alpha=ALPHA,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config)
    if ours is not None:  # start from our A, B so both contenders compute the same function
        inner = model.base_model.model
        with torch.no_grad():
            for name, module in ours.named_modules():
                if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.Parameter):
                    target = inner.get_submodule(name)
                    target.lora_A["default"].weight.copy_(module.lora_A)
                    target.lora_B["default"].weight.copy_(module.lora_B)
    return model


def build_contenders(setup: Setup, names: tuple[str, ...]) -> dict[str, nn.Module]:
    """The requested contenders on the same pretrained weights (and, where ours exists, the same initial head)."""
    torch.manual_seed(SEED)
    models: dict[str, nn.Module] = {}
    ours = None
    if "ours" in names:
        module = LoRAModule(
            backbone=setup.alias, task=setup.task, num_labels=2, target_modules=list(setup.target_modules),
            rank=RANK, alpha=ALPHA, dropout=0.0,
        )
        ours = models["ours"] = module.backbone

    def fresh_base() -> nn.Module:
        if ours is not None:  # the same loaded weights and head, adapters taken out
            return unload_adapters(copy.deepcopy(ours), merge=False)
        return load_backbone(setup.alias, setup.task, num_labels=2)

    if "floor" in names:
        floor = fresh_base()
        floor.requires_grad_(False)
        if setup.task == "sequence-classification":
            for head in find_classifier_head(floor):
                floor.get_submodule(head).requires_grad_(True)
        models["floor"] = floor
    if "peft" in names:
        models["peft"] = _peft_model(setup, fresh_base(), ours)
    for model in models.values():
        model.train()
    return {name: models[name] for name in CONTENDERS if name in models}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, batches: list[dict[str, torch.Tensor]], losses: list[float]):
    """A closure running training step ``i``: seeded, fixed batch, AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None

    def step(i: int) -> None:
        torch.manual_seed(SEED + i)
        loss = model(**batches[i % len(batches)]).loss
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step


# ----------------------------------------------------------------------------- memory probe (subprocess)
def probe(setup: Setup, name: str, steps: int) -> dict[str, float]:
    """Run inside a fresh process: the training-step memory of one contender."""
    models = build_contenders(setup, (name,))
    batches = make_batches(setup, steps)
    step = make_step(models[name], batches, [])
    reset = reset_peak_rss()
    before = rss_mb()
    for i in range(steps):
        step(i)
    peak = peak_rss_mb()
    return {"rss_before_step_mb": before, "peak_rss_mb": peak, "delta_step_mb": peak - before,
            "peak_reset": reset, "probe_steps": steps}


# ----------------------------------------------------------------------------- benchmark
def run_setup(setup: Setup, steps: int, warmup: int, probe_steps: int, threads: int, command: str) -> dict:
    print(f"\n== {setup.alias}: batch {setup.batch_size}, seq {setup.seq_len}, LoRA r={RANK} a={ALPHA:g} "
          f"on {list(setup.target_modules)}", flush=True)
    start = time.perf_counter()
    models = build_contenders(setup, CONTENDERS)
    print(f"   built contenders in {time.perf_counter() - start:.1f} s", flush=True)
    batches = make_batches(setup, warmup + steps)
    losses = {name: [] for name in models}
    step_fns = {name: make_step(model, batches, losses[name]) for name, model in models.items()}
    start, load_before = time.perf_counter(), load_average()
    cpu_times: dict[str, list[float]] = {}
    times = interleaved_times(step_fns, steps=steps, warmup=warmup, cpu_times=cpu_times)
    load_after = load_average()
    print(f"   timed {warmup}+{steps} rounds in {time.perf_counter() - start:.1f} s; load average "
          f"{load_before} -> {load_after}", flush=True)
    adapted = sum(1 for m in models["ours"].modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.Parameter))
    loss_diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["peft"]))
    counts = {name: trainable_parameters(model) for name, model in models.items()}
    del models, step_fns

    memory = {}
    for name in CONTENDERS:
        memory[name] = probe_in_subprocess(
            [str(Path(__file__).resolve()), "--probe", f"{setup.alias}:{name}", "--probe-steps", str(probe_steps),
             "--threads", str(threads)]
        )
        print(f"   memory probe {name}: {memory[name]}", flush=True)

    stats = {name: summarize(t) for name, t in times.items()}
    cpu_stats = {name: summarize(t) for name, t in cpu_times.items()}
    result = {
        "command": command,
        "setup": asdict(setup),
        "rank": RANK, "alpha": ALPHA, "lora_dropout": 0.0, "optimizer": f"AdamW(lr={LEARNING_RATE})",
        "adapted_layers": adapted,
        "steps": steps, "warmup": warmup, "torch_threads": threads, "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after,
        "loss_max_abs_diff_ours_vs_peft": loss_diff,
        "contenders": {},
    }
    for name in CONTENDERS:
        result["contenders"][name] = {
            "label": LABELS[name] or setup.floor_label,
            "trainable_params": counts[name],
            **stats[name],
            "ratio_vs_peft": stats[name]["median_ms"] / stats["peft"]["median_ms"],
            "ratio_vs_floor": stats[name]["median_ms"] / stats["floor"]["median_ms"],
            "paired_ratio_vs_peft": paired_ratio(times[name], times["peft"]),
            "paired_ratio_vs_floor": paired_ratio(times[name], times["floor"]),
            "cpu": {
                **cpu_stats[name],
                "ratio_vs_peft": cpu_stats[name]["median_ms"] / cpu_stats["peft"]["median_ms"],
                "ratio_vs_floor": cpu_stats[name]["median_ms"] / cpu_stats["floor"]["median_ms"],
            },
            "memory": memory[name],
            "losses": losses[name][warmup:],
            "times_ms": [t * 1e3 for t in times[name]],
            "cpu_times_ms": [t * 1e3 for t in cpu_times[name]],
        }
    return result


def table(result: dict) -> str:
    rows = []
    for c in result["contenders"].values():
        rows.append([
            c["label"], f"{c['trainable_params']:,}", c["median_ms"], f"{c['p25_ms']:.0f}–{c['p75_ms']:.0f}",
            f"{c['ratio_vs_peft']:.2f}", f"{c['ratio_vs_floor']:.2f}", c["cpu"]["median_ms"],
            f"{c['cpu']['ratio_vs_peft']:.2f}", f"{c['cpu']['ratio_vs_floor']:.2f}",
            c["memory"]["peak_rss_mb"], c["memory"]["delta_step_mb"],
        ])
    headers = ["contender", "trainable params", "median step ms", "IQR ms", "ratio vs PEFT", "ratio vs floor",
               "median CPU ms", "CPU ratio vs PEFT", "CPU ratio vs floor", "peak RSS MB", "Δ step MB"]
    return markdown_table(headers, rows, align="lrrrrrrrrrr")


def section(alias: str, result: dict) -> list[str]:
    setup = SETUPS[alias]
    load = result["load_average_before"], result["load_average_after"]
    return [
        "",
        f"## {alias}: batch {setup.batch_size}, seq {setup.seq_len}, LoRA r={RANK}, α={ALPHA:g} on "
        f"{', '.join(setup.target_modules)} ({result['adapted_layers']} layers)",
        "",
        f"Median over {result['steps']} timed steps after {result['warmup']} warmup steps, "
        f"{result['torch_threads']} torch thread(s) on {result['cpu_count']} CPUs; load average (1/5/15 min) "
        f"before / after timing: {load[0]} / {load[1]}.",
        "",
        table(result),
        "",
        f"Loss agreement ours vs PEFT (same initial weights, batches and dropout seeds): max |Δloss| = "
        f"{result['loss_max_abs_diff_ours_vs_peft']:.2e}.",
        "",
        f"Command: `{result['command']}`",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed rounds per contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--only", choices=sorted(SETUPS),
                        help="run one backbone only (the other's results already in the JSON are kept)")
    parser.add_argument("--probe-steps", type=int, default=3, help="training steps in each memory probe")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs available)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: 'alias:contender' memory probe
    args = parser.parse_args()

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)

    if args.probe:
        alias, name = args.probe.split(":")
        print(json.dumps(probe(SETUPS[alias], name, args.probe_steps)))
        return

    command = reproduce_command()
    results = {}
    previous = RESULTS_DIR / "step_time.json"
    if args.only and previous.is_file():
        results = json.loads(previous.read_text()).get("results", {})
    for alias in ([args.only] if args.only else list(SETUPS)):
        results[alias] = run_setup(SETUPS[alias], args.steps, args.warmup, args.probe_steps, threads, command)
    results = {alias: results[alias] for alias in SETUPS if alias in results}

    sections = [
        "# Training step time and peak memory: floor vs lora-lightning LoRA vs PEFT LoRA",
        "",
        f"CPU, torch {torch.__version__}. A step is forward + loss + backward + AdamW step + zero_grad on the raw "
        "modules (no Trainer); contenders interleaved round-robin on the same weights, batches and seeds. "
        "\"median CPU ms\" is process CPU time per step, less distorted than wall time when other jobs share the "
        "machine. Peak memory: resident-set high-water mark of a fresh subprocess per contender, reset after "
        "loading; Δ step = peak minus RSS before the first step (see the docstring of benchmarks/step_time.py).",
    ]
    for alias, result in results.items():
        sections += section(alias, result)
    markdown = "\n".join(sections)
    print("\n" + markdown)
    commands = " && ".join(dict.fromkeys(r["command"] for r in results.values()))
    json_path, md_path = write_results(
        "step_time", {"environment": environment(threads), "results": results}, markdown, commands
    )
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
