"""Every hook of lora_lightning/_compat.py against the installed Lightning: a Lightning that moved one of the
internals it reads fails here, loudly, instead of changing resume or calibration behaviour silently."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from lora_lightning._compat import fit_train_dataloaders, processed_train_batches


def tiny_trainer(tmp_path, callback: L.Callback) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=tmp_path, callbacks=[callback])


class RecordProcessed(L.Callback):
    def __init__(self) -> None:
        self.at_start: list[tuple[int, int]] = []
        self.at_end: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.at_start.append((batch_idx, processed_train_batches(trainer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_end.append((batch_idx, processed_train_batches(trainer)))


def test_processed_train_batches_counts_the_batches_trained_on_in_this_epoch(tmp_path):
    record = RecordProcessed()
    data = DataLoader(RandomDataset(32, 4), batch_size=2)  # 2 batches an epoch: step 3 is batch 0 of epoch 1
    tiny_trainer(tmp_path, record).fit(BoringModel(), train_dataloaders=data)
    assert record.at_start == [(0, 0), (1, 1), (0, 0)], "a batch fetched but not yet trained on is not counted"
    assert record.at_end == [(0, 1), (1, 2), (0, 1)]


class RecordSource(L.Callback):
    def setup(self, trainer, pl_module, stage) -> None:
        self.source = fit_train_dataloaders(trainer)


def test_fit_train_dataloaders_is_the_loader_given_to_fit_during_setup(tmp_path):
    record = RecordSource()
    data = DataLoader(RandomDataset(32, 4), batch_size=2)
    tiny_trainer(tmp_path, record).fit(BoringModel(), train_dataloaders=data)
    assert record.source is data


def test_fit_train_dataloaders_falls_back_to_the_modules_own_loader(tmp_path):
    record = RecordSource()
    tiny_trainer(tmp_path, record).fit(BoringModel())  # BoringModel defines train_dataloader() itself
    assert isinstance(record.source, DataLoader)
    assert len(record.source.dataset) == len(BoringModel().train_dataloader().dataset)


def test_installed_lightning_is_within_the_tested_bounds():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (lightning,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "lightning"]
    assert lightning.specifier.contains(L.__version__), (
        f"Lightning {L.__version__} is outside the tested range {lightning.specifier}: run tests/test_compat.py on it "
        f"and widen pyproject.toml's bound only if it passes."
    )
