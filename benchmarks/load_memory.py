"""Host memory of building a LoRA module, then one no-grad forward (or, with ``--step B T``, one training step on a
B × T batch), for each backbone option, one fresh process per row so peaks do not mix. Prints a Markdown table;
figures go to docs/large_models.md. FOLDER: a safetensors checkpoint (e.g. the packaged SmolLM2 saved with
``save_pretrained`` after ``model.hf_quantizer.remove_quantization_config(model)``).

    python benchmarks/load_memory.py --backbone smollm2 --dtypes float32 bfloat16
    python benchmarks/load_memory.py --backbone FOLDER --dtypes float32 bfloat16 --quantization nf4 int8
    python benchmarks/load_memory.py --backbone FOLDER --dtypes float32 --quantization nf4 --step 2 256 --checkpointing

Columns: peak RSS of the process (``ru_maxrss``; file pages of a memory-mapped checkpoint count once touched), and
``RssAnon`` after it (memory private to the process: what 8 processes of a node each hold).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, torch
from lora_lightning.modules import LoRAModule
backbone, dtype, quantization, checkpointing, batch, block = sys.argv[1:7]
module = LoRAModule(backbone=backbone, task="causal-lm", backbone_dtype=dtype, quantization=quantization,
                    gradient_checkpointing=checkpointing == "1")
ids = torch.randint(0, 1000, (int(batch) or 1, int(block) or 8))
if int(batch):
    module.train()(({"input_ids": ids, "labels": ids})).loss.backward()
else:
    with torch.no_grad():
        module.eval()({"input_ids": ids})
anon = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon_mib": anon / 1024}))
"""


def measure(backbone: str, dtype: str, quantization: str, checkpointing: bool, step: list[int]) -> dict:
    argv = [backbone, dtype, quantization, str(int(checkpointing)), *map(str, step)]
    out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smollm2")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quantization", nargs="*", default=[], help="extra rows: nf4 / int8 at float32 compute")
    parser.add_argument("--step", nargs=2, type=int, default=[0, 0], metavar=("BATCH", "BLOCK"),
                        help="measure one training step (forward + backward) instead of a no-grad forward")
    parser.add_argument("--checkpointing", action="store_true", help="gradient_checkpointing: true")
    args = parser.parse_args()
    rows = [(dtype, "none") for dtype in args.dtypes] + [("float32", q) for q in args.quantization]
    what = f"training step {args.step[0]} x {args.step[1]}" if args.step[0] else "no-grad forward"
    print(f"backbone: {args.backbone}, {what}, gradient_checkpointing: {args.checkpointing}\n")
    print("| backbone_dtype | quantization | peak RSS (MiB) | RssAnon after (MiB) |")
    print("|---|---|---|---|")
    for dtype, quantization in rows:
        result = measure(args.backbone, dtype, quantization, args.checkpointing, args.step)
        print(f"| {dtype} | {quantization} | {result['peak_rss_mib']:.0f} | {result['anon_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
