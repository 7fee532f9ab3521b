"""Faults: a fit killed with SIGKILL resumes from ``last``; interrupted checkpoint and export writes leave the
previous file or folder intact; bad checkpoints and exports are clear errors, never raw unpickling tracebacks."""
from __future__ import annotations

import shutil

import fsspec.implementations.local as fsspec_local
import pytest
import torch

import lora_lightning.export as export
from tests.cluster.launcher import finish, launch, write_config
from lora_lightning.checkpoint import CheckpointReadError, read_checkpoint
from lora_lightning.cli import run_cli
from lora_lightning.modules import AdaLoRAModule, CheckpointMismatchError, LoRAModule

pytestmark = pytest.mark.integration


def test_kill_9_then_fit_ckpt_path_last_completes(tiny_bert, tmp_path):
    """Checkpoints every 4 steps; SIGKILL at step 6; the same command resumes from step 4 (2 steps lost)."""
    run = tmp_path / "job"
    config = write_config(run, tiny_bert, "LoRAModule", checkpoint_every=4, callbacks=[
        {"class_path": "cluster_callbacks.SignalAtStep",
         "init_args": {"step": 6, "signum": "SIGKILL", "marker": str(run / "killed")}},
        {"class_path": "cluster_callbacks.DumpState", "init_args": {"path": str(run / "final{rank}.pt")}}])
    code, output = finish(launch(config, log=run / "first.log"), run / "first.log")
    assert code == -9, output[-2000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4
    code, output = finish(launch(config, log=run / "second.log"), run / "second.log")
    assert code == 0, output[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in output
    assert torch.load(run / "final0.pt")["global_step"] == 8


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A 2-step LoRA fit through the CLI; returns (config, last.ckpt)."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_config(folder, tiny_bert, "LoRAModule", max_steps=2, checkpoint_every=2)
    run_cli(["fit", "--config", str(config)])
    return config, folder / "checkpoints" / "last.ckpt"


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch):
    """Lightning writes checkpoints through an fsspec transaction (a temporary file moved into place on success):
    a write that dies half-way (here: raises after writing half the bytes) leaves the old file as it was."""
    config, last = trained
    target = tmp_path / "last.ckpt"
    shutil.copy(last, target)
    before = target.read_bytes()
    module = LoRAModule.load_from_checkpoint(last, weights_only=True)
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=1)
    trainer.strategy.connect(module)
    original = fsspec_local.LocalFileOpener.write

    def dies_half_way(self, data):
        original(self, data[: len(data) // 2])
        raise OSError("No space left on device (simulated crash mid-write)")

    monkeypatch.setattr(fsspec_local.LocalFileOpener, "write", dies_half_way)
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert read_checkpoint(target)["global_step"] == 2


def test_interrupted_export_keeps_the_previous_export(trained, tmp_path, monkeypatch):
    config, last = trained
    module = LoRAModule.load_from_checkpoint(last, weights_only=True)
    folder = export.export_peft(module, tmp_path / "adapter")
    config_before, tensors_before = export.read_peft_export(folder)

    def dies_half_way(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 100)
        raise KeyboardInterrupt  # what a kill delivers to Python

    monkeypatch.setattr(export, "save_file", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        export.export_peft(module, folder, overwrite=True)
    config_after, tensors_after = export.read_peft_export(folder)
    assert config_after == config_before and tensors_after.keys() == tensors_before.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")], "staging folder left behind"


def damaged_copies(last, folder):
    data = last.read_bytes()
    truncated, garbage = folder / "truncated.ckpt", folder / "garbage.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"\x80\x02not a checkpoint" + bytes(range(256)) * 4)
    return truncated, garbage


def test_damaged_checkpoint_given_to_fit_is_a_clear_error(trained, tmp_path):
    config, last = trained
    for damaged in damaged_copies(last, tmp_path):
        with pytest.raises(CheckpointReadError, match=f"'{damaged}' cannot be read .*truncated or corrupted"):
            run_cli(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "again"),
                     "--ckpt_path", str(damaged)])


def test_damaged_checkpoint_given_to_load_from_checkpoint_is_a_clear_error(trained, tmp_path):
    config, last = trained
    for damaged in damaged_copies(last, tmp_path):
        with pytest.raises(CheckpointReadError, match="truncated or corrupted"):
            LoRAModule.load_from_checkpoint(damaged, weights_only=True)


def test_checkpoint_of_another_method_or_backbone_is_a_clear_error(trained, tmp_path, tiny_llama):
    config, last = trained
    # (an explicit --ckpt_path FILE cannot mismatch through the CLI: LightningCLI replaces the model config by the
    # checkpoint's hyperparameters, method included; "last" is resolved after the model is built, and checked)
    other = write_config(tmp_path / "other_method", str(read_checkpoint(last)["hyper_parameters"]["backbone"]),
                         "AdaLoRAModule", checkpoint_every=2)
    (tmp_path / "other_method" / "checkpoints").mkdir()
    shutil.copy(last, tmp_path / "other_method" / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointMismatchError, match="holds a LoRAModule but is being loaded into a AdaLoRAModule"):
        run_cli(["fit", "--config", str(other), "--ckpt_path", "last"])
    # Lightning itself refuses a checkpoint whose class is not a subclass of the one loading it (a ValueError
    # naming both); a subclass checkpoint reaching on_load_checkpoint gets our CheckpointMismatchError
    with pytest.raises(ValueError, match="lora_lightning.modules.LoRAModule.*AdaLoRAModule"):
        AdaLoRAModule.load_from_checkpoint(last, weights_only=True)
    with pytest.raises(CheckpointMismatchError, match="trained on backbone"):
        LoRAModule.load_from_checkpoint(last, backbone=tiny_llama, task="causal-lm", target_modules="all-linear",
                                        weights_only=True)


def test_export_folder_with_a_missing_or_damaged_file_is_a_clear_error(trained, tmp_path):
    config, last = trained
    folder = export.export_peft(LoRAModule.load_from_checkpoint(last, weights_only=True), tmp_path / "adapter")
    export.read_peft_export(folder)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(export.ExportReadError, match="incomplete: adapter_model.safetensors missing"):
        export.read_peft_export(broken)
    shutil.copy(folder / "adapter_model.safetensors", broken / "adapter_model.safetensors")
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(export.ExportReadError, match="truncated or corrupted"):
        export.read_peft_export(broken)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(export.ExportReadError, match="not valid JSON"):
        export.read_peft_export(broken)
    with pytest.raises(export.ExportReadError, match="does not exist"):
        export.read_peft_export(tmp_path / "nowhere")


def test_damaged_checkpoint_given_to_trainer_fit_from_python_is_a_clear_error(trained, tmp_path, tiny_bert):
    import lightning as L

    from lora_lightning.checkpoint import SafeCheckpointIO
    from lora_lightning.data import TextClassificationDataModule

    _, last = trained
    data = TextClassificationDataModule(backbone=tiny_bert, source="rotten_tomatoes", max_train_samples=16,
                                        max_eval_samples=8, max_length=16, batch_size=8, num_labels=2)
    for damaged in damaged_copies(last, tmp_path):
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, default_root_dir=tmp_path, plugins=[SafeCheckpointIO()])
        with pytest.raises(CheckpointReadError, match=f"'{damaged}' cannot be read .*truncated or corrupted"):
            trainer.fit(LoRAModule(backbone=tiny_bert, rank=2), data, ckpt_path=damaged)
        assert trainer.global_step == 0


def test_cli_trainer_reads_checkpoints_through_safe_checkpoint_io(trained, tmp_path):
    from lora_lightning.checkpoint import SafeCheckpointIO

    config, last = trained
    cli = run_cli(["validate", "--config", str(config), "--trainer.default_root_dir", str(tmp_path),
                   "--ckpt_path", str(last)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert cli.trainer.ckpt_path == str(last)
