"""Host memory of a sharded (FSDP2) fit when every process reads the base against ``base_from_rank0`` (only global
rank 0 reads it; the others build it empty and receive their shards).

Both runs are the real ``lora-lightning fit`` console script with Lightning's ``ModelParallelStrategy`` over
``--processes`` CPU processes (gloo), LoRA on every linear layer of a random-weight Llama of ``--size``
(:mod:`random_llama`, saved once under ``--cache`` as float32 and as bfloat16, loaded as float32: mapped from the
file, or converted) and the packaged Hamlet text, ``--steps`` optimiser steps. Each process reports its resident-set
high-water mark when training starts (the base read, sharded, received: where the two differ) and over the whole
fit, and its last training loss, which must be equal between the runs. Writes
``benchmarks/results/rank0_loading.{json,md}``.

    python benchmarks/rank0_loading.py      # 0.5B base (1.9 GiB as float32), 2 processes, ~6 min
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml

from common import markdown_table, peak_rss_mb, write_results
from random_llama import RANK, TARGETS, parameter_count, save_random_backbone

HERE = Path(__file__).resolve().parent
CONTENDERS = {"every process reads the base": False, "base_from_rank0": True}
STORED_DTYPES = {"float32": "float32 (mapped)", "bfloat16": "bfloat16 (converted)"}


class ReportPeakRSS(L.Callback):
    """Each process writes to ``<folder>/rank<r>.json`` its peak RSS (MiB) when training starts (the base read,
    sharded and, with ``base_from_rank0``, received), its peak over the whole fit, and its last training loss."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.loading_peak_mib = float("nan")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loading_peak_mib = peak_rss_mb()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = {"loading_peak_mib": self.loading_peak_mib, "peak_mib": peak_rss_mb(),
                  "loss": float(trainer.callback_metrics["train/loss"])}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def fit_config(folder: Path, backbone: Path, args, from_rank0: bool) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": args.processes, "max_steps": args.steps, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "limit_val_batches": 0, "default_root_dir": str(folder),
            "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                         "init_args": {"data_parallel_size": args.processes, "tensor_parallel_size": 1}},
            "callbacks": [{"class_path": "rank0_loading.ReportPeakRSS", "init_args": {"folder": str(folder)}}],
        },
        "model": {"class_path": "lora_lightning.modules.LoRAModule",
                  "init_args": {"backbone": str(backbone), "task": "causal-lm", "target_modules": TARGETS,
                                "rank": RANK, "base_from_rank0": from_rank0}},
        "data": {"class_path": "lora_lightning.data.CausalLMDataModule",
                 "init_args": {"source": "hamlet", "block_size": args.block, "batch_size": 1, "max_eval_samples": 4}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(backbone: Path, args, from_rank0: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="rank0_loading_") as scratch:
        folder = Path(scratch)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        script = Path(sys.executable).parent / "lora-lightning"
        done = subprocess.run([str(script), "fit", "--config", str(fit_config(folder, backbone, args, from_rank0))],
                              env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"the fit failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(args.processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5B", help="random_llama.SHAPES key")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--block", type=int, default=64, help="tokens per row (batch 1 per process)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora_lightning_random_llama"))
    args = parser.parse_args()
    base_gib = parameter_count(args.size) * 4 / 2**30
    results: dict[str, dict[str, list[dict]]] = {}
    for stored in STORED_DTYPES:
        backbone = save_random_backbone(args.size, args.cache / f"{args.size}-{stored}", getattr(torch, stored))
        results[stored] = {name: run(backbone, args, from_rank0) for name, from_rank0 in CONTENDERS.items()}
    rows, loss_gap = [], 0.0
    for stored, by_contender in results.items():
        plain, from_rank0 = by_contender.values()
        loss_gap = max(loss_gap, *(abs(a["loss"] - b["loss"]) for a, b in zip(plain, from_rank0)))
        for name, ranks in by_contender.items():
            loading = sum(r["loading_peak_mib"] for r in ranks)
            rows.append([STORED_DTYPES[stored], name, *[f"{r['loading_peak_mib'] / 1024:.2f}" for r in ranks],
                         f"{loading / 1024:.2f}", f"{loading / sum(r['loading_peak_mib'] for r in plain):.2f}",
                         f"{max(r['peak_mib'] for r in ranks) / 1024:.2f}"])
    headers = ["checkpoint on disk", "", *[f"rank {r} (GiB)" for r in range(args.processes)], "all processes (GiB)",
               "× every process reads", "whole-fit peak, largest process (GiB)"]
    markdown = "\n".join([
        f"Peak host memory (resident-set high-water mark) of each process of a {args.processes}-process FSDP2 fit "
        f"(ModelParallelStrategy, gloo, CPU) when training starts: the base read, sharded and (`base_from_rank0`) "
        f"received. LoRA r={RANK} on every linear layer of a random {args.size} Llama loaded as float32 "
        f"({base_gib:.2f} GiB), Hamlet, {args.steps} steps of 1 × {args.block} tokens per process. Each process also "
        "holds ~0.5 GiB that any process needs (Python, torch, transformers, Lightning, the data). RSS counts a "
        "memory-mapped file's pages in every process that touches them although the node holds them once: a "
        "float32 checkpoint is mapped, not copied, so the processes that read it share most of it; a bfloat16 "
        "checkpoint loaded as float32 is converted, a private copy per process.", "",
        markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2)), "",
        "The whole-fit peak adds the training steps, where FSDP2 over gloo on CPU leaves a few hundred MiB of "
        "gathered blocks to the allocator, varying from run to run by about as much as the two contenders differ; "
        "it is shown, not compared.", "",
        f"Last training loss, largest difference between the two contenders over the processes: {loss_gap:.2e}."])
    print(markdown)
    write_results("rank0_loading", {"args": vars(args), "base_gib": base_gib, "results": results}, markdown)


if __name__ == "__main__":
    main()
