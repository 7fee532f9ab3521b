"""HessianSensitivityEstimator in a Trainer: allocation in setup, installation through configure_callbacks,
outputs, bad input, resume without recalibration, and DDP (2 processes) giving identical patterns."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers import random_batch
from lora_lightning.callbacks import HessianSensitivityEstimator
from lora_lightning.callbacks.sensitivity import JSON_NAME
from lora_lightning.modules import SensitivityLoRAModule

TARGETS = ["query", "dense"]  # inputs of different nature (LayerNorm output, attention context, GELU)


def loader(n=4, seed=0):
    return DataLoader([random_batch(seed=seed + i) for i in range(n)], batch_size=None)


def trainer(tmp_path, steps=2, **kwargs):
    defaults = dict(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def module(tiny_bert, **kwargs):
    kwargs = {"r_avg": 3, "num_batches": 2, "target_modules": TARGETS, **kwargs}
    torch.manual_seed(0)
    model = SensitivityLoRAModule(backbone=tiny_bert, **kwargs)
    for layer in model.modules():  # deterministic steps for the equality checks
        if isinstance(layer, nn.Dropout):
            layer.p = 0.0
    return model


def test_installed_through_configure_callbacks_and_allocates_in_setup(tiny_bert, tmp_path):
    model = module(tiny_bert, r_max=5)
    uniform = {n: layer.rank for n, layer in model.lora_layers().items()}
    assert set(uniform.values()) == {3}
    t = trainer(tmp_path)
    t.fit(model, train_dataloaders=loader())
    estimators = [c for c in t.callbacks if isinstance(c, HessianSensitivityEstimator)]
    assert len(estimators) == 1 and estimators[0].calibrated
    ranks = {n: layer.rank for n, layer in model.lora_layers().items()}
    assert ranks == model.allocation
    assert sum(ranks.values()) == 3 * len(ranks) and max(ranks.values()) <= 5 and len(set(ranks.values())) > 1
    report = model.allocation_report
    assert report["estimator"] == "activation" and report["num_batches_total"] == 2
    assert report["trainable_lora_parameters"] == sum(
        r * (layer.in_features + layer.out_features) for r, layer in zip(ranks.values(), model.lora_layers().values())
    )
    # the optimiser holds the reshaped factors (allocation happened before configure_optimizers)
    optimised = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert all(id(layer.lora_A) in optimised for layer in model.lora_layers().values())


def test_user_configured_estimator_is_kept(tiny_bert, tmp_path):
    mine = HessianSensitivityEstimator(estimator="fisher", num_batches=3)
    model = module(tiny_bert)
    t = trainer(tmp_path, callbacks=[mine])
    t.fit(model, train_dataloaders=loader())
    assert [c for c in t.callbacks if isinstance(c, HessianSensitivityEstimator)] == [mine]
    assert model.allocation_report["estimator"] == "fisher" and model.allocation_report["num_batches_total"] == 3


def test_outputs_json_beside_checkpoint_and_tensorboard(tiny_bert, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    t = trainer(tmp_path, logger=TensorBoardLogger(tmp_path, name="tb"), enable_checkpointing=True,
                callbacks=[checkpoints])
    model = module(tiny_bert)
    t.fit(model, train_dataloaders=loader())
    written = json.loads((tmp_path / "ckpt" / JSON_NAME).read_text())
    assert written["rank_pattern"] == model.allocation and written["estimator"] == "activation"
    assert set(written["scores"]) == set(model.allocation)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 1000  # the heat-map image is in there


def test_empty_calibration_data_fails_before_work(tiny_bert, tmp_path):
    model = module(tiny_bert)
    t = trainer(tmp_path, callbacks=[HessianSensitivityEstimator(dataloader=[])])
    with pytest.raises(ValueError, match="calibration data is empty"):
        t.fit(model, train_dataloaders=loader())


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match="Unknown sensitivity estimator"):
        HessianSensitivityEstimator(estimator="hessian-magic")
    with pytest.raises(ValueError, match="num_batches"):
        HessianSensitivityEstimator(num_batches=0)


class ExplodingData:
    """Calibration data that must never be read (a resumed run does not recalibrate)."""

    def __iter__(self):
        raise AssertionError("recalibrated on resume")


class CountingData:
    """Calibration data that counts how often it is read."""

    def __init__(self, batches) -> None:
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def straight_run(tiny_bert, tmp_path):
    """Two epochs of two steps, a checkpoint after the first; returns (module, the checkpoint, the data)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Two steps per epoch, the same batch each step: Lightning does not restore the position in a plain
    # DataLoader exactly on resume (it re-reads an epoch's first batch), which is not what is tested here.
    data = DataLoader([random_batch(seed=0)] * 2, batch_size=None)
    straight = module(tiny_bert, estimator="fisher")
    saver = ModelCheckpoint(dirpath=tmp_path / "a", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, steps=4, enable_checkpointing=True, callbacks=[saver]).fit(straight, train_dataloaders=data)
    first = tmp_path / "a" / "epoch=0-step=2.ckpt"
    assert first.exists()
    return straight, first, data


def assert_same_adapters(resumed, straight) -> None:
    assert resumed.allocation == straight.allocation
    expected = {k: v for k, v in straight.state_dict().items() if k in set(straight.adapter_state_keys())}
    got = resumed.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fit_ckpt_path_alone_calibrates_warns_and_still_ends_with_the_checkpoint_ranks(tiny_bert, tmp_path):
    straight, first, data = straight_run(tiny_bert, tmp_path)
    resumed = module(tiny_bert, estimator="fisher", num_batches=1)
    calibration = CountingData([random_batch(seed=7)])
    estimator = HessianSensitivityEstimator(dataloader=calibration)
    with pytest.warns(UserWarning, match=r"trainer\.ckpt_path = path"):
        trainer(tmp_path, steps=4, callbacks=[estimator]).fit(resumed, train_dataloaders=data, ckpt_path=first)
    assert calibration.reads == 1 and not estimator.calibrated
    assert_same_adapters(resumed, straight)


def test_resume_keeps_shapes_without_recalibration_and_matches_uninterrupted(tiny_bert, tmp_path):
    straight, first, data = straight_run(tiny_bert, tmp_path)
    resumed = module(tiny_bert, estimator="fisher")
    assert resumed.allocation is None and {layer.rank for layer in resumed.lora_layers().values()} == {3}
    estimator = HessianSensitivityEstimator(dataloader=ExplodingData())
    t = trainer(tmp_path, steps=4, callbacks=[estimator])
    t.ckpt_path = first  # Lightning's public way to name the checkpoint before fit (the CLI does the same)
    t.fit(resumed, train_dataloaders=data)
    assert not estimator.calibrated
    assert_same_adapters(resumed, straight)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L, torch
    from torch.utils.data import DataLoader
    sys.path.insert(0, {root!r})
    from tests.helpers import random_batch
    from lora_lightning.callbacks import HessianSensitivityEstimator
    from lora_lightning.modules import SensitivityLoRAModule

    class Record(HessianSensitivityEstimator):
        out = None

        def _batches(self, trainer, num_batches, device):
            batches = super()._batches(trainer, num_batches, device)
            self.seen = [int(b["input_ids"].sum()) for b in batches]
            return batches

        def on_train_start(self, trainer, pl_module):
            with open(f"{{self.out}}/rank{{trainer.global_rank}}.json", "w") as f:
                json.dump({{"ranks": pl_module.allocation, "seen": self.seen}}, f)

    def main(devices, num_batches, out):
        torch.manual_seed(0)
        model = SensitivityLoRAModule(backbone={bert!r}, r_avg=3, target_modules={targets!r}, estimator={est!r})
        data = DataLoader([random_batch(seed=i) for i in range(8)], batch_size=None)
        callback = Record(num_batches=num_batches, dataloader=data)
        callback.out = out
        kwargs = dict(strategy="ddp_spawn", devices=2) if devices == 2 else dict(devices=1)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kwargs)
        trainer.fit(model, train_dataloaders=DataLoader([random_batch(seed=i) for i in range(2)], batch_size=None))

    if __name__ == "__main__":
        out = {out!r} + "/" + sys.argv[1]
        import os; os.makedirs(out, exist_ok=True)
        main(2 if sys.argv[1] == "ddp" else 1, 2 if sys.argv[1] == "ddp" else 4, out)
    """
)


@pytest.mark.integration  # two processes
@pytest.mark.parametrize("estimator", ["activation"])
def test_ddp_two_processes_allocate_identically(tiny_bert, tmp_path, estimator):
    script = tmp_path / "ddp_sensitivity.py"
    root = Path(__file__).resolve().parents[2]
    script.write_text(DDP_SCRIPT.format(root=str(root), bert=tiny_bert, targets=TARGETS, est=estimator, out=str(tmp_path)))
    for mode in ("ddp", "single"):
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=600,
                              cwd=root)
        assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((tmp_path / "ddp" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "ddp" / "rank1.json").read_text())
    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert rank0["seen"] != rank1["seen"]  # each process calibrated on its own batches
    assert rank0["ranks"] == rank1["ranks"]
    # the reduced statistics equal one process over the union of the batches
    assert sorted(rank0["seen"] + rank1["seen"]) == sorted(single["seen"])
    assert rank0["ranks"] == single["ranks"]


def test_fewer_calibration_batches_than_num_batches_warns(tiny_bert, tmp_path):
    few = list(loader())[:2]
    t = trainer(tmp_path, callbacks=[HessianSensitivityEstimator(num_batches=5, dataloader=few)])
    with pytest.warns(UserWarning, match=r"calibrated on 2 batches, fewer than num_batches asks for \(5 over 1"):
        t.fit(module(tiny_bert), train_dataloaders=loader())
