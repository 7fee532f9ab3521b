"""GPU check: a random-weight ~7B Llama, bf16 base + activation checkpointing, a few LoRA training steps with our
LoRA (plain loss and in chunks), our Sensitivity-LoRA and PEFT's LoRA side by side: tokens/s and peak memory.

No download: the backbone is built from ``random_llama.SHAPES["7B"]`` (Llama-2-7B's shape, the SmolLM2 tokenizer)
and saved once to ``--cache``. Each contender runs in a fresh process (peaks apart):

* ours: ``LoRAModule`` / ``SensitivityLoRAModule`` (``backbone_dtype: bfloat16``, ``gradient_checkpointing: true``,
  r=16 / r_avg=16 on all linear layers; "chunked loss": ``loss_chunk_tokens: 512``) trained by a Lightning
  ``Trainer`` (``precision="bf16-mixed"``; Sensitivity-LoRA calibrates from the first ``--calibration`` batches
  before training, outside the timing);
* peft: ``from_pretrained(dtype=bfloat16)`` + ``gradient_checkpointing_enable(use_reentrant=False)`` +
  ``get_peft_model`` (same LoRA), a plain loop under ``torch.autocast(bfloat16)`` with AdamW.

Timing: wall time of each training step (forward, backward, optimiser), synchronised, the first ``--warmup`` steps
dropped; tokens/s = batch x block / median step. Memory: ``torch.cuda.max_memory_allocated`` since the first step
(CPU: the process's RSS high-water mark since then).

    bash benchmarks/gpu_check.sh                       # one GPU, writes benchmarks/results/gpu_check.{md,json}
    python benchmarks/gpu_check.py --tiny              # CPU, a 2-layer model: checks the path, writes nothing
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import markdown_table, peak_rss_mb, probe_in_subprocess, reset_peak_rss, write_results
from random_llama import CHUNK_TOKENS, RANK, TARGETS, Setup, parameter_count, random_batch, save_random_backbone

CONTENDERS = ("ours LoRA", "ours LoRA, chunked loss", "ours Sensitivity-LoRA", "PEFT LoRA")
SETUP = Setup("bf16 + ckpt", "bfloat16", True)


class StepMeter:
    """Synchronised wall time and loss of each step; the memory peak restarts at the first step."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device, self.times, self.losses, self._start = torch, device, [], [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def start(self) -> None:
        if not self.times and not self.losses:
            if self.device == "cuda":
                self.torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
        self._sync()
        self._start = time.perf_counter()

    def stop(self, loss: float) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        self.losses.append(loss)

    def peak_mib(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else peak_rss_mb()


def run_ours(spec: dict[str, Any], meter: StepMeter, batches: list) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from lora_lightning.modules import LoRAModule, SensitivityLoRAModule

    common = {"backbone": spec["folder"], "task": "causal-lm", "target_modules": TARGETS, "dropout": 0.0,
              "backbone_dtype": SETUP.dtype, "gradient_checkpointing": SETUP.checkpointing}
    if spec["contender"].startswith("ours LoRA"):
        chunks = CHUNK_TOKENS if spec["contender"].endswith("chunked loss") else 0
        module = LoRAModule(rank=RANK, alpha=2 * RANK, loss_chunk_tokens=chunks, **common)
    else:
        module = SensitivityLoRAModule(r_avg=RANK, r_min=RANK // 4, r_max=4 * RANK, alpha=2 * RANK,
                                       num_batches=spec["calibration"], **common)

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            meter.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            meter.stop(float(outputs["loss"]))

    trainer = L.Trainer(accelerator=spec["device"].replace("cuda", "gpu"), devices=1, precision="bf16-mixed",
                        max_steps=spec["steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Meter()])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))  # the batches as they are


def run_peft(spec: dict[str, Any], meter: StepMeter, batches: list) -> None:
    import torch

    from random_llama import build_peft, training_step

    model = build_peft(Path(spec["folder"]), SETUP).to(spec["device"])
    step = training_step("peft", model)
    for batch in batches[:spec["steps"]]:
        meter.start()
        with torch.autocast(spec["device"], dtype=torch.bfloat16):
            loss = step({key: value.to(spec["device"]) for key, value in batch.items()})
        meter.stop(loss)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One contender in this fresh process."""
    import torch

    torch.manual_seed(0)
    meter = StepMeter(spec["device"])
    count = spec["steps"] + spec["calibration"]
    batches = [random_batch(spec["batch"], spec["block"], seed=i) for i in range(count)]
    if spec["contender"] == "PEFT LoRA":
        run_peft(spec, meter, batches)
    else:
        run_ours(spec, meter, batches)
    timed = meter.times[spec["warmup"]:]
    return {"step_s": meter.times, "losses": meter.losses, "peak_mib": meter.peak_mib(),
            "tokens_per_s": spec["batch"] * spec["block"] / statistics.median(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="CPU, a 2-layer model, 1 x 64 tokens: checks the path")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=4, help="Sensitivity-LoRA calibration batches")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lora_lightning_random_llama"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    size, device = ("tiny", "cpu") if args.tiny else ("7B", "cuda")
    if args.tiny:
        args.batch, args.block, args.steps, args.warmup, args.calibration = 1, 64, 3, 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("No CUDA device visible: run on a GPU machine, or use --tiny for the CPU path check.")
    folder = save_random_backbone(size, args.cache / f"{size}-bfloat16", torch.bfloat16, device=device)
    results = {}
    for contender in CONTENDERS:
        spec = {"folder": str(folder), "contender": contender, "device": device, "batch": args.batch,
                "block": args.block, "steps": args.steps, "warmup": args.warmup, "calibration": args.calibration}
        results[contender] = probe_in_subprocess([__file__, "--child", json.dumps(spec)], timeout=1800)
    peft = results["PEFT LoRA"]
    rows = [[name, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}",
             f"{r['peak_mib'] / 1024:.2f}", f"{r['peak_mib'] / peft['peak_mib']:.2f}", f"{r['losses'][0]:.4f}"]
            for name, r in results.items()]
    memory = "peak CUDA memory (GiB)" if device == "cuda" else "peak RSS (GiB)"
    markdown = "\n\n".join([
        f"# GPU check: {size} random-weight Llama ({parameter_count(size) / 1e9:.2f}B parameters), bf16 base + "
        f"checkpointing, {args.batch} x {args.block} tokens, {args.steps} steps ({args.warmup} warmup)",
        markdown_table(["contender", "tokens/s", "× PEFT", memory, "× PEFT", "first loss"], rows, align="lrrrrr"),
    ])
    print(markdown)
    payload = {"size": size, "device": device, "args": {k: v for k, v in vars(args).items() if k != "cache"},
               "results": results}
    if not args.tiny:
        write_results("gpu_check", {**payload, "device_name": torch.cuda.get_device_name()}, markdown)
    print(json.dumps(payload, default=str))


if __name__ == "__main__":
    main()
