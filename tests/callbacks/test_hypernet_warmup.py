"""HypernetWarmup: the hypernet param group's LR ramps over the first steps, through the optimiser only."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.helpers import random_batch
from lora_lightning.callbacks.hypernet_warmup import HypernetWarmup
from lora_lightning.modules.hyperadalora import HyperLoRAModule


class RecordLR(Callback):
    """Records each group's LR as the optimiser applied it (a step post-hook) and the requires_grad flags."""

    def __init__(self) -> None:
        self.applied: list[dict[str, float]] = []
        self.flags: list[bool] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def post_hook(optimizer, args, kwargs):
            self.applied.append({g["name"]: g["lr"] for g in optimizer.param_groups})
            self.flags.append(all(p.requires_grad for p in pl_module.hypernet.parameters()))
        trainer.optimizers[0].register_step_post_hook(post_hook)


def fit(tiny_bert, steps, callbacks, scheduler=True, **options):
    torch.manual_seed(0)
    options = {"hypernet_warmup": 4, **options}
    module = HyperLoRAModule(backbone=tiny_bert, rank=2, target_modules=["query", "value"], hypernet_hidden=16,
                             hypernet_heads=2, learning_rate=1e-3, hypernet_lr=2e-3, **options)
    if not scheduler:
        module.lr_scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    loader = torch.utils.data.DataLoader([random_batch(seed=i) for i in range(steps)], batch_size=None)
    trainer.fit(module, loader)
    return module, trainer


def test_ramps_only_the_hypernet_group_and_restores_the_scheduled_lr(tiny_bert):
    record = RecordLR()
    module, trainer = fit(tiny_bert, 6, [record], scheduler=False)
    warmups = [cb for cb in trainer.callbacks if isinstance(cb, HypernetWarmup)]
    assert len(warmups) == 1  # installed by the module
    assert [round(r["hypernet"], 8) for r in record.applied] == [5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3]
    assert all(r["adapters"] == 1e-3 for r in record.applied)
    assert all(record.flags)  # never a requires_grad toggle
    assert {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}["hypernet"] == 2e-3
    assert warmups[0].state_dict() == {"warmup_steps": 4, "resolved_steps": 4, "step": 6, "decay_steps": None}


def test_front_loaded_generator_lr_decays_to_zero_by_the_fold(tiny_bert):
    record = RecordLR()
    module, trainer = fit(tiny_bert, 6, [record], scheduler=False, hypernet_warmup=0, hypernet_fold_at=4)
    assert [round(r["hypernet"], 8) for r in record.applied] == [2e-3, 1.5e-3, 1e-3, 5e-4, 0.0, 0.0]
    assert all(r["adapters"] == 1e-3 for r in record.applied) and all(record.flags)
    assert module.hypernet.folded


def test_composes_with_the_lr_scheduler(tiny_bert):
    record = RecordLR()
    module, trainer = fit(tiny_bert, 6, [record])
    # the module's default schedule moves both groups alike; the ramp multiplies the hypernet group on top
    ramp = [min(1.0, (s + 1) / 4) for s in range(6)]
    assert len({round(r["adapters"], 10) for r in record.applied}) > 1  # the scheduler did act
    for s, r in enumerate(record.applied):
        assert r["hypernet"] == pytest.approx(2 * r["adapters"] * ramp[s])


def test_user_configured_warmup_wins_and_state_round_trips(tiny_bert):
    mine = HypernetWarmup(warmup_steps=2)
    record = RecordLR()
    _, trainer = fit(tiny_bert, 3, [record, mine], scheduler=False)  # record hooks in first
    assert [cb for cb in trainer.callbacks if isinstance(cb, HypernetWarmup)] == [mine]
    assert [round(r["hypernet"], 8) for r in record.applied] == [1e-3, 2e-3, 2e-3]
    other = HypernetWarmup()
    other.load_state_dict(mine.state_dict())
    assert other.state_dict() == mine.state_dict() and other.factor(0) == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError):
        HypernetWarmup(warmup_steps=-1)
    with pytest.raises(ValueError):
        HypernetWarmup(warmup_steps=1.5)
