"""A fit resumed from a checkpoint written in the middle of an epoch trains on the batches an uninterrupted fit
would have, and ends with the same adapter weights (32 samples of 8: 4 batches per epoch)."""
from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tests.data.test_resumable_loader import sampler_state
from tests.integration.test_trainer_features import SaveRankState, adapter_state, assert_same_state, data, model, trainer

pytestmark = pytest.mark.integration


class RecordBatches(Callback):
    """The (epoch, batch_idx, first token ids) of every training batch this process trains on."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, tuple(batch["input_ids"][:, 1].tolist())))


def checkpoints(folder) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1, filename="{step}")


@pytest.mark.parametrize(("resume_step", "accumulate", "val_every"), [
    (3, 1, None),  # epoch 0, after batch 3 of 4
    (6, 1, 2),  # epoch 1, after batch 2 of 4, with validation run mid-epoch (after batch 2)
    (3, 2, None),  # epoch 1, after batch 2 of 4 (two batches per optimiser step)
])
def test_mid_epoch_resume_equals_uninterrupted_fit(tiny_bert, tmp_path, resume_step, accumulate, val_every):
    extra = dict(accumulate_grad_batches=accumulate, max_steps=10)
    if val_every:
        extra.update(val_check_interval=val_every, limit_val_batches=1, num_sanity_val_steps=0)
    reference_batches = RecordBatches()
    reference = model(tiny_bert)
    trainer(tmp_path / "reference", enable_checkpointing=True, **extra,
            callbacks=[checkpoints(tmp_path / "ckpt"), reference_batches]).fit(reference, data(tiny_bert))
    assert reference.trainer.global_step == 10
    ckpt = tmp_path / "ckpt" / f"step={resume_step}.ckpt"
    consumed = resume_step * accumulate % 4
    assert consumed, "the checkpoint must be mid-epoch"
    saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert sampler_state(saved) == {"epoch": resume_step * accumulate // 4, "yielded": consumed * 8}

    resumed_batches = RecordBatches()
    resumed = model(tiny_bert)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "resumed", **extra, callbacks=[resumed_batches]).fit(
            resumed, data(tiny_bert), ckpt_path=ckpt)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert resumed.trainer.global_step == 10
    assert resumed_batches.seen == reference_batches.seen[resume_step * accumulate:]
    assert_same_state(adapter_state(resumed), adapter_state(reference))


def test_ddp_mid_epoch_resume_equals_uninterrupted_fit(tiny_bert, tmp_path):
    """Two processes, 16 samples each: 2 batches per epoch; step 3 is after the first batch of epoch 1."""
    (tmp_path / "reference").mkdir()
    (tmp_path / "resumed").mkdir()
    ddp = dict(strategy="ddp_spawn", devices=2, max_steps=6)
    trainer(tmp_path / "reference", enable_checkpointing=True, **ddp, callbacks=[
        checkpoints(tmp_path / "ckpt"), SaveRankState(str(tmp_path / "reference"))]).fit(model(tiny_bert), data(tiny_bert))
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    saved = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert sampler_state(saved) == {"epoch": 1, "yielded": 8}  # one batch of this rank's shard
    trainer(tmp_path / "resumed", **ddp, callbacks=[SaveRankState(str(tmp_path / "resumed"))]).fit(
        model(tiny_bert), data(tiny_bert), ckpt_path=ckpt)
    for rank in range(2):
        assert_same_state(torch.load(tmp_path / "resumed" / f"rank{rank}.pt"),
                          torch.load(tmp_path / "reference" / f"rank{rank}.pt"))
