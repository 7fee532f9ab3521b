"""Training-step time of Sensitivity-LoRA against LoRA at the same total rank, interleaved in one process.

Sensitivity-LoRA trains plain ``LoRALinear`` layers whose ranks come from the allocation, so its step should cost
what LoRA's does (target <= 1.02x). Both modules are built on the packaged MiniLM; the Sensitivity-LoRA ranks are the
``activation`` allocation of 16 Rotten Tomatoes calibration batches (r_avg 8, r_max 24), applied through
``LoRAModule(rank_pattern=...)`` exactly as the estimator callback would. Step = forward + backward + AdamW step.

    python benchmarks/sensitivity_step_time.py --steps 30 --warmup 3
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    environment, interleaved_times, markdown_table, module_training_step, paired_ratio, summarize, write_results,
)
from lora_lightning.data import TextClassificationDataModule  # noqa: E402
from lora_lightning.modules import LoRAModule, SensitivityLoRAModule  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]


def sensitivity_ranks(data: TextClassificationDataModule) -> dict[str, int]:
    """Run the real allocation (the module's own estimator callback, in ``setup``) and return its rank pattern."""
    module = SensitivityLoRAModule(backbone="minilm", target_modules=TARGETS, r_avg=8, r_max=24, alpha=16,
                                   estimator="activation", num_batches=16)
    L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    return {name: layer.rank for name, layer in module.adapters.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    L.seed_everything(0)
    data = TextClassificationDataModule(backbone="minilm", source="rotten_tomatoes", max_length=64, batch_size=16,
                                        num_labels=2)
    data.setup("fit")
    batches = [batch for _, batch in zip(range(8), data.train_dataloader())]
    ranks = sensitivity_ranks(data)
    contenders = {
        "LoRA r=8": LoRAModule(backbone="minilm", target_modules=TARGETS, rank=8, alpha=16),
        "Sensitivity-LoRA (activation, r_avg 8)": LoRAModule(backbone="minilm", target_modules=TARGETS, rank=8,
                                                             alpha=16, rank_pattern=ranks),
    }
    assert sum(ranks.values()) == 8 * len(ranks)
    steps = {name: module_training_step(m, batches, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                                                        lr=1e-3))
             for name, m in contenders.items()}
    times = interleaved_times(steps, args.steps, args.warmup)
    reference = times["LoRA r=8"]
    rows = [[name, f"{summarize(t)['median_ms']:.1f}", f"{paired_ratio(t, reference):.3f}"] for name, t in times.items()]
    table = markdown_table(["contender", "median step ms", "ratio vs LoRA (paired)"], rows)
    markdown = (f"# Sensitivity-LoRA step time vs LoRA (MiniLM b16 s64, total rank 8 x {len(ranks)})\n\n{table}\n\n"
                f"Ranks {min(ranks.values())}-{max(ranks.values())}; {args.steps} interleaved rounds after "
                f"{args.warmup} warm-up rounds.\n")
    print(markdown)
    write_results("sensitivity_step_time", {"times": times, "ranks": ranks, "environment": environment()}, markdown)


if __name__ == "__main__":
    main()
