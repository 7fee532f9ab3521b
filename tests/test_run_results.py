"""What a fit leaves behind is trustworthy (issue 10, items 1, 2, 3, 14), through the CLI with the shipped configs and
through the Python API, on a tiny random backbone and the packaged Rotten Tomatoes data:

* the last checkpoint, the summary and the last metrics are those of the final step, also when the run stops between
  two validations, and an AdaLoRA/HyperAdaLoRA last checkpoint holds the final (pruned) rank pattern;
* a non-finite loss or weight stops the fit with a clear error and never reaches a checkpoint (fp16 loss-scaling skips
  stay allowed);
* the monitored metric follows the task (regression with a shipped config), an unknown one is refused before training;
* ``--trainer.max_steps 20`` with a shipped ``val_check_interval: 100`` runs, with a one-line warning.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from transformers import AutoTokenizer, BertForSequenceClassification

from lora_lightning.callbacks import NonFiniteGuard, NonFiniteTrainingError, TaskCheckpoint, UnknownMonitorError
from lora_lightning.callbacks.final_checkpoint import saved_step
from lora_lightning.cli import clamp_val_check_interval
from lora_lightning.cli import main as cli_main
from lora_lightning.data import TextClassificationDataModule
from lora_lightning.modules import LoRAModule
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).parents[1] / "configs"


def cli_args(config: str, backbone: str, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / config), "--model.init_args.backbone", backbone,
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--data.init_args.max_train_samples", "48", "--data.init_args.max_eval_samples", "8",
            "--data.init_args.max_length", "32", *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def regression_files(folder: Path) -> list[str]:
    """train.csv / validation.csv with real-valued labels (a regression task)."""
    paths = []
    for split, count in (("train", 48), ("validation", 16)):
        path = folder / f"{split}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([f"sample sentence number {i} of {split}", f"{(i % 7) / 2:.2f}"] for i in range(count))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def tiny_regression_bert(tiny_bert, tmp_path_factory) -> str:
    """``tiny_bert`` with a one-output (regression) head: its saved two-class head does not load with num_labels=1."""
    folder = tmp_path_factory.mktemp("tiny-bert-regression")
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=1, ignore_mismatched_sizes=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return str(folder)


def trainer_in(tmp_path: Path, **kwargs) -> L.Trainer:
    """A quiet CPU trainer whose checkpoints (when a ModelCheckpoint is given) go under ``tmp_path``."""
    return quiet_trainer(default_root_dir=tmp_path, enable_checkpointing=True, **kwargs)


def rotten_tomatoes(backbone: str) -> TextClassificationDataModule:
    return TextClassificationDataModule(backbone=backbone, source="rotten_tomatoes", max_train_samples=48,
                                        max_eval_samples=8, max_length=32, batch_size=8, num_labels=2)


class ValidationSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


# ----------------------------------------------------------------- items 1 and 14: the final state is what is left
@pytest.mark.parametrize("method", ["adalora", "hyperadalora"])
def test_short_run_of_a_shipped_config_leaves_last_checkpoint_with_final_rank_pattern(method, tiny_bert, tmp_path,
                                                                                       capsys):
    # 48 samples / 16 = 3 batches an epoch, 20 steps, the config validates every 100: Lightning refused this run
    with pytest.warns(UserWarning, match=r"val_check_interval 100 is longer than the run \(max_steps 20\)"):
        cli_main(cli_args(f"{method}/minilm_rotten_tomatoes.yaml", tiny_bert, tmp_path, "--trainer.max_steps", "20"))
    last = next(tmp_path.rglob("last.ckpt"))
    checkpoint = load(last)
    assert checkpoint["global_step"] == 20
    masks = {key.removeprefix("backbone.").removesuffix(".rank_mask"): value
             for key, value in checkpoint["state_dict"].items() if key.endswith("rank_mask")}
    assert len(masks) == 13 and all(mask.numel() == 12 for mask in masks.values())  # init_r 12
    assert sum(int(mask.sum()) for mask in masks.values()) == 8 * 13  # target_r 8: pruned to the final budget
    written = json.loads((last.parent / "rank_pattern.json").read_text())
    assert written["final"] and written["rank_pattern"] == {name: int(mask.sum()) for name, mask in masks.items()}
    out = capsys.readouterr().out
    assert "fit finished at step 20" in out and "validation at step 20:" in out
    assert f"last checkpoint      {last}  (step 20)" in out


def test_run_stopping_between_validations_validates_and_checkpoints_its_final_step(tiny_bert, tmp_path, capsys):
    cli_main(cli_args("lora/minilm_rotten_tomatoes.yaml", tiny_bert, tmp_path, "--trainer.max_steps", "7",
                      "--trainer.val_check_interval", "3"))  # validations at 3 and 6, training ends at 7
    last, best = next(tmp_path.rglob("last.ckpt")), next(tmp_path.rglob("best.ckpt"))
    assert load(last)["global_step"] == 7
    assert load(best)["global_step"] in (3, 6, 7)
    out = capsys.readouterr().out
    assert "validation at step 7:" in out
    assert f"last checkpoint      {last}  (step 7)" in out
    assert f"best checkpoint      {best}  (step {load(best)['global_step']}, val/accuracy" in out


def test_python_api_fit_validates_and_saves_last_at_its_final_step(tiny_bert, tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/loss", save_last=True)
    validations = ValidationSteps()
    trainer = trainer_in(tmp_path, max_steps=5, val_check_interval=2, callbacks=[checkpoint, validations])
    trainer.fit(LoRAModule(backbone=tiny_bert, rank=4), rotten_tomatoes(tiny_bert))
    assert validations.steps == [2, 4, 5]
    assert saved_step(checkpoint.last_model_path) == 5


# ----------------------------------------------------------------- item 2: non-finite training stops the run
def assert_finite_checkpoints(root: Path) -> int:
    """Every checkpoint under ``root`` holds finite tensors only; returns how many there are."""
    paths = list(root.rglob("*.ckpt"))
    for path in paths:
        state = load(path)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
    return len(paths)


def test_cli_run_with_a_huge_learning_rate_stops_with_a_clear_error(tiny_bert, tmp_path, capsys):
    args = cli_args("lora/minilm_rotten_tomatoes.yaml", tiny_bert, tmp_path, "--trainer.max_steps", "6",
                    "--trainer.val_check_interval", "1", "--model.init_args.learning_rate", "1e30",
                    "--model.init_args.warmup_ratio", "0")
    with pytest.raises((NonFiniteTrainingError, SystemExit)) as raised:
        cli_main(args)
    if isinstance(raised.value, SystemExit):  # the CLI may turn errors into a one-line message and an exit status
        assert raised.value.code not in (0, None)
    message = f"{raised.value} {capsys.readouterr().err}"
    assert "optimiser step 2" in message and "learning_rate (this run: 1e+30)" in message
    assert assert_finite_checkpoints(tmp_path) >= 1  # step 1 was validated and saved, nothing after it
    assert all(load(path)["global_step"] == 1 for path in tmp_path.rglob("*.ckpt"))


def test_python_api_fit_with_a_huge_learning_rate_raises(tiny_bert, tmp_path):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_last=True)
    trainer = trainer_in(tmp_path, max_steps=6, val_check_interval=2, callbacks=[checkpoint])
    module = LoRAModule(backbone=tiny_bert, rank=4, learning_rate=1e30, warmup_ratio=0.0)
    with pytest.raises(NonFiniteTrainingError, match=r"at optimiser step \d+ .*lower learning_rate"):
        trainer.fit(module, rotten_tomatoes(tiny_bert))
    assert trainer.global_step < 6
    assert_finite_checkpoints(tmp_path)


class OverflowingGradients(L.LightningModule):
    """A finite loss of 1e35 whose fp16-scaled gradients overflow until the GradScaler has lowered its scale."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def training_step(self, batch, batch_idx):
        return (self.weight * 1e35).mean() + 0 * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-40)


def test_fp16_loss_scaling_skipped_steps_are_allowed(tmp_path):
    precision = MixedPrecision("16-mixed", "cpu")
    trainer = quiet_trainer(max_steps=4, plugins=[precision], callbacks=[NonFiniteGuard()])
    trainer.fit(OverflowingGradients(), torch.utils.data.DataLoader(torch.zeros(8, 2), batch_size=2))
    assert trainer.global_step == 4
    assert precision.scaler.get_scale() == 2.0 ** 16 / 8  # three steps were skipped by the scaler, none stopped the fit


# ----------------------------------------------------------------- item 3: the monitor follows the task
def test_regression_with_a_shipped_config_monitors_pearson(tiny_regression_bert, tmp_path):
    train, validation = regression_files(tmp_path)
    cli_main(cli_args("lora/minilm_rotten_tomatoes.yaml", tiny_regression_bert, tmp_path / "run", "--model.init_args.num_labels",
                      "1", "--data.init_args.source", "files", "--data.init_args.train_file", train,
                      "--data.init_args.validation_file", validation, "--trainer.max_steps", "4",
                      "--trainer.val_check_interval", "2"))
    checkpoint = load(next(tmp_path.rglob("best.ckpt")))
    (key,) = [key for key in checkpoint["callbacks"] if key.startswith("TaskCheckpoint")]
    assert "'monitor': 'val/pearson'" in key and "'mode': 'max'" in key  # Lightning's state key of the callback
    assert torch.isfinite(torch.as_tensor(checkpoint["callbacks"][key]["best_model_score"]))


def test_a_monitor_the_module_never_logs_is_refused_before_training(tiny_regression_bert, tmp_path):
    train, validation = regression_files(tmp_path)
    data = TextClassificationDataModule(backbone=tiny_regression_bert, source="files", train_file=train,
                                        validation_file=validation, max_length=32, batch_size=8)
    trainer = trainer_in(tmp_path, max_steps=2, callbacks=[ModelCheckpoint(monitor="val/accuracy")])
    with pytest.raises(UnknownMonitorError, match=r"monitor='val/accuracy'.*val/loss, val/pearson, val/spearman"):
        trainer.fit(LoRAModule(backbone=tiny_regression_bert, rank=4, num_labels=1), data)
    assert trainer.global_step == 0


@pytest.mark.parametrize(("monitor", "task", "num_labels", "expected"), [
    ("task", "causal-lm", 1, ("val/perplexity", "min")),
    ("task", "sequence-classification", 1, ("val/pearson", "max")),
    ("task", "sequence-classification", 2, ("val/accuracy", "max")),
    ("val/f1", "sequence-classification", 2, ("val/f1", "max")),
    ("val/loss", "sequence-classification", 2, ("val/loss", "min")),
])
def test_task_checkpoint_takes_monitor_and_mode_from_the_module(monitor, task, num_labels, expected, tiny_bert,
                                                                  tiny_regression_bert, tiny_llama, tmp_path):
    backbone = tiny_llama if task == "causal-lm" else tiny_regression_bert if num_labels == 1 else tiny_bert
    module = LoRAModule(backbone=backbone, task=task, num_labels=num_labels)
    callback = TaskCheckpoint(monitor=monitor)
    callback.setup(trainer_in(tmp_path), module, "fit")
    assert (callback.monitor, callback.mode) == expected
    assert callback.kth_value == (torch.inf if expected[1] == "min" else -torch.inf)


# ----------------------------------------------------------------- item 14: the clamp itself
@pytest.mark.parametrize(("config", "expected"), [
    ({"val_check_interval": 100, "max_steps": 20}, 20),
    ({"val_check_interval": 100, "max_steps": 20, "accumulate_grad_batches": 2}, 40),  # interval counts batches
    ({"val_check_interval": 10, "max_steps": 20}, 10),
    ({"val_check_interval": 0.5, "max_steps": 20}, 0.5),  # a fraction of an epoch
    ({"val_check_interval": 100, "max_steps": -1}, 100),  # no step limit
])
def test_val_check_interval_is_clamped_to_the_run(config, expected):
    clamp_val_check_interval(config)
    assert config["val_check_interval"] == expected
