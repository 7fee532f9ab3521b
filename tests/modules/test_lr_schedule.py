"""The default LR schedule is transformers' get_linear_schedule_with_warmup, stepped once per optimiser step."""
from __future__ import annotations

import pytest
from lightning.pytorch.callbacks import Callback

from lora_lightning.modules import LoRAModule
from tests.helpers import batch_loader, quiet_trainer


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("warmup_ratio, warmup", [(0.0, 0), (0.3, 3)])
def test_default_schedule_is_linear_warmup_then_linear_decay(tiny_bert, warmup_ratio, warmup):
    lr, total = 1e-2, 10
    module = LoRAModule(backbone=tiny_bert, target_modules=["query"], learning_rate=lr, warmup_ratio=warmup_ratio)
    record = RecordLR()
    quiet_trainer(max_steps=total, callbacks=[record]).fit(module, batch_loader(total))
    # step t (0-based) trains at lr · t / W during warm-up, then lr · (T - t) / (T - W)
    expected = [lr * (t / warmup if t < warmup else (total - t) / (total - warmup)) for t in range(total)]
    assert record.lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if warmup == 0:
        assert record.lrs[0] == lr  # no warm-up: the first step already trains at the full rate
    else:
        assert record.lrs[0] == 0.0 and record.lrs[warmup] == lr  # transformers' warm-up starts at 0
