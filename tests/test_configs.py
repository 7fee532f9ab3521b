"""Every shipped YAML parses against the code, and runs two steps with a tiny backbone substituted.

GLUE configs need the hub; their data is replaced by local files in the task's GLUE schema, so the rest of the
config (model, optimiser, trainer settings) is still exercised as shipped.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from lora_lightning.cli import main as cli_main
from lora_lightning.data import GLUE_TASKS

pytestmark = pytest.mark.integration
CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def glue_files(task_name: str, folder: Path) -> list[str]:
    task = GLUE_TASKS[task_name]
    rows = [{**{field: f"sample text {i} {field}" for field in task.text_fields},
             "label": float(i % 5) if task.num_labels == 1 else i % task.num_labels} for i in range(48)]
    paths = []
    for split in ("train", "validation"):
        path = folder / f"{split}.tsv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        paths.append(str(path))
    return ["--data.init_args.source", "files", "--data.init_args.train_file", paths[0],
            "--data.init_args.validation_file", paths[1], "--data.init_args.text_fields", str(list(task.text_fields)),
            "--data.init_args.label_field", "label"]


def test_there_is_a_config_per_shipped_method():
    assert {path.parent.name for path in CONFIGS} >= {"lora"}
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_with_tiny_backbone(config, tiny_bert, tiny_llama, tmp_path):
    spec = yaml.safe_load(config.read_text())
    causal = spec["model"]["init_args"].get("task") == "causal-lm"
    args = ["fit", "--config", str(config), "--model.init_args.backbone", tiny_llama if causal else tiny_bert,
            "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--data.init_args.max_train_samples", "48", "--data.init_args.max_eval_samples", "8"]
    source = spec["data"]["init_args"].get("source", "")
    if source.startswith("glue/"):
        args += glue_files(source.split("/", 1)[1], tmp_path)
    cli_main(args)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "the config's fit wrote no checkpoint"
