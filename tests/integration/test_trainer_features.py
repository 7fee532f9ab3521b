"""Lightning features on real data (packaged Rotten Tomatoes) with a tiny random backbone: each proven by values."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lora_lightning.data import TextClassificationDataModule
from lora_lightning.modules import LoRAModule

pytestmark = pytest.mark.integration


def data(backbone: str, samples: int = 32, batch_size: int = 8) -> TextClassificationDataModule:
    return TextClassificationDataModule(
        backbone=backbone, source="rotten_tomatoes", max_train_samples=samples, max_eval_samples=16,
        max_length=32, batch_size=batch_size, num_labels=2,
    )


def model(backbone: str, **kwargs) -> LoRAModule:
    torch.manual_seed(0)
    return LoRAModule(backbone=backbone, rank=4, target_modules=["query", "value", "dense"], **kwargs)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    default_root_dir=tmp_path, deterministic=True)
    return L.Trainer(**{**defaults, **kwargs})


def adapter_state(module: LoRAModule) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {key: state[key].detach().clone() for key in module.adapter_state_keys()}


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


class RecordLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


class SaveRankState(Callback):
    """Each DDP rank writes its adapter weights, so the test can compare the ranks."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save(adapter_state(pl_module), f"{self.folder}/rank{trainer.global_rank}.pt")


def test_bf16_mixed_trains(tiny_bert, tmp_path):
    record = RecordLoss()
    fit = trainer(tmp_path, precision="bf16-mixed", max_steps=40, callbacks=[record], deterministic=False)
    fit.fit(model(tiny_bert, learning_rate=1e-2, warmup_ratio=0.0), data(tiny_bert, samples=16))
    first, last = sum(record.losses[:4]) / 4, sum(record.losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)


def test_gradient_accumulation_equals_large_batch(tiny_bert, tmp_path):
    accumulated = model(tiny_bert)
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2).fit(accumulated, data(tiny_bert, batch_size=4))
    large = model(tiny_bert)
    trainer(tmp_path, max_steps=3).fit(large, data(tiny_bert, batch_size=8))
    assert accumulated.trainer.global_step == large.trainer.global_step == 3
    assert_same_state(adapter_state(accumulated), adapter_state(large), atol=1e-5)
    untouched = model(tiny_bert)
    assert not torch.allclose(adapter_state(untouched)["backbone.classifier.weight"],
                              adapter_state(large)["backbone.classifier.weight"])


def test_resume_equals_uninterrupted_run(tiny_bert, tmp_path):
    """Fit 12 steps (3 epochs of 4 batches) saving every 4; resume from step 8; compare with the full run."""
    full = model(tiny_bert)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path, max_steps=12, enable_checkpointing=True, callbacks=[saver]).fit(full, data(tiny_bert))
    resumed = model(tiny_bert)
    resumed_trainer = trainer(tmp_path, max_steps=12)
    resumed_trainer.fit(resumed, data(tiny_bert), ckpt_path=tmp_path / "ckpt" / "step=8.ckpt")
    assert resumed_trainer.global_step == 12
    assert_same_state(adapter_state(resumed), adapter_state(full))


def test_tensorboard_is_the_default_logger(tiny_bert, tmp_path):
    fit = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2,
                    default_root_dir=tmp_path, enable_progress_bar=False)
    assert isinstance(fit.logger, TensorBoardLogger)
    fit.fit(model(tiny_bert), data(tiny_bert))
    events = list((tmp_path / "lightning_logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert {"val/accuracy", "val/f1", "val/loss"} <= set(fit.callback_metrics)


def test_ddp_two_processes_end_with_identical_adapters(tiny_bert, tmp_path):
    fit = trainer(tmp_path, strategy="ddp_spawn", devices=2, max_steps=4, callbacks=[SaveRankState(str(tmp_path))])
    module = model(tiny_bert)
    before = adapter_state(module)
    fit.fit(module, data(tiny_bert))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert_same_state(rank0, rank1, atol=0)
    assert not torch.equal(rank0["backbone.classifier.weight"], before["backbone.classifier.weight"])
