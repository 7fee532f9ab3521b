"""Every shipped YAML parses against the code, and runs two steps with a tiny backbone substituted.

GLUE configs need the hub; their data is replaced by local files in the task's GLUE schema, so the rest of the
config (model, optimiser, trainer settings) is still exercised as shipped. Paper-scale configs (a hub id such as
``Qwen/Qwen2.5-7B-Instruct``) get a tiny randomly initialised backbone of the same architecture, built from a small
config (no download), and their hub chat data is replaced by the packaged chat fixture; their backbone options
(bf16 base, checkpointing, 4-bit) run as shipped, on CPU.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from transformers import Qwen2Config, Qwen2ForCausalLM

from lora_lightning.backbone import load_tokenizer
from lora_lightning.cli import main as cli_main
from lora_lightning.data import GLUE_TASKS
from tests.helpers import one_process_group

pytestmark = pytest.mark.integration
CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
CHAT_FIXTURE = Path(__file__).parent / "data" / "fixtures" / "chat_hamlet.jsonl"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> str:
    """A 2-layer Qwen2 (hidden 32, q/k/v biases as Qwen2.5) with the packaged SmolLM2 tokenizer and its chat
    template, as a local folder."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_backbone(backbone: str, causal: bool, tiny: dict[str, str]) -> str:
    """The tiny stand-in for a config's backbone: same architecture for hub ids of Qwen2/Llama decoders, else a tiny
    Llama (causal LM) or BERT (classification: BERT, RoBERTa and MiniLM configs)."""
    name = backbone.lower().replace("qwen2.5", "qwen2")
    architecture = next((arch for arch in ("qwen2", "llama") if "/" in name and arch in name), None)
    return tiny[architecture] if architecture else tiny["llama"] if causal else tiny["bert"]


def hub_chat_data_as_file(data_args: dict) -> list[str]:
    """Replace a ``source: datasets`` chat config's hub data by the packaged chat fixture (its format kept)."""
    assert data_args.get("format") == "chat", "a hub-data config this test knows how to replace is a chat config"
    return ["--data.init_args.source", "files", "--data.init_args.train_file", str(CHAT_FIXTURE),
            "--data.init_args.dataset", "null", "--data.init_args.validation_split", "null",
            "--data.init_args.block_size", "256"]


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
def test_config_runs_with_tiny_backbone(config, tiny_bert, tiny_llama, tiny_qwen2, tmp_path):
    spec = yaml.safe_load(config.read_text())
    causal = spec["model"]["init_args"].get("task") == "causal-lm"
    backbone = tiny_backbone(spec["model"]["init_args"]["backbone"], causal,
                             {"bert": tiny_bert, "llama": tiny_llama, "qwen2": tiny_qwen2})
    args = ["fit", "--config", str(config), "--model.init_args.backbone", backbone,
            "--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--data.init_args.max_train_samples", "48", "--data.init_args.max_eval_samples", "8"]
    source = spec["data"]["init_args"].get("source", "")
    if source.startswith("glue/"):
        args += glue_files(source.split("/", 1)[1], tmp_path)
    if source == "datasets":
        args += hub_chat_data_as_file(spec["data"]["init_args"])
    if "ModelParallelStrategy" in str(spec["trainer"].get("strategy")):  # one process here (2-process FSDP2 runs: tests/integration/test_fsdp2.py)
        args += ["--trainer.devices", "1", "--trainer.strategy.init_args.data_parallel_size", "1"]
    with one_process_group():
        cli_main(args)
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, "the config's fit wrote no checkpoint"
    saved = torch.load(checkpoints[0], map_location="cpu", weights_only=False)["hyper_parameters"]
    for option in ("backbone_dtype", "gradient_checkpointing", "quantization", "loss_chunk_tokens"):
        if option in spec["model"]["init_args"]:  # the backbone options ran as shipped
            assert saved[option] == spec["model"]["init_args"][option]
