"""RankPruningScheduler inside a Trainer: optimiser steps (not micro-batches), skipped non-finite steps, bf16,
exact resume, DDP-identical state, truncation of pruned triplets and its state_dict."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from tests.helpers import FlipFirstTriplet, TruncationProbe, batch_loader, quiet_trainer, scheduler_on_units
from lora_lightning.allocation.importance import RankUnit
from lora_lightning.callbacks import RankPruningScheduler
from lora_lightning.modules import AdaLoRAModule

TARGETS = ["query", "value", "dense"]




def adalora(tiny_bert, **kwargs) -> AdaLoRAModule:
    torch.manual_seed(0)
    args = dict(backbone=tiny_bert, init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2, target_modules=TARGETS,
                learning_rate=1e-2)
    module = AdaLoRAModule(**{**args, **kwargs})
    for m in module.modules():  # no dropout: runs compared step by step must be deterministic
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def scheduler_of(t: L.Trainer) -> RankPruningScheduler:
    return next(cb for cb in t.callbacks if isinstance(cb, RankPruningScheduler))


def total_kept(module) -> int:
    return sum(module.kept_ranks().values())


# ----------------------------------------------------------------- steps are optimiser steps
def test_gradient_accumulation_counts_optimizer_steps(tiny_bert, monkeypatch):
    module = adalora(tiny_bert)
    updates = []
    original = RankPruningScheduler.allocate

    def counting(self, pl_module, step, trainer=None):
        updates.append(step)
        return original(self, pl_module, step, trainer)

    monkeypatch.setattr(RankPruningScheduler, "allocate", counting)
    t = quiet_trainer(max_epochs=1, accumulate_grad_batches=3)
    t.fit(module, batch_loader(24))
    sched = scheduler_of(t)
    assert t.global_step == 8 and sched.schedule.total_step == 8  # estimated_stepping_batches, not 24 batches
    assert updates == list(range(1, 9))
    assert sched.finalised and total_kept(module) == 2 * len(module.adapters)


class SkipNonFinite(AdaLoRAModule):
    """Injects an inf gradient at one step and skips that optimiser step, as fp16 loss scaling does."""

    bad_step = 4

    def on_after_backward(self) -> None:
        if self.trainer.global_step + 1 == self.bad_step:
            next(iter(self.rank_units().values())).lam.grad[0] = float("inf")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer_closure()
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            optimizer.step()


def test_a_step_with_non_finite_gradients_is_skipped_and_pruning_proceeds(tiny_bert):
    torch.manual_seed(0)
    module = SkipNonFinite(backbone=tiny_bert, init_r=4, target_r=2, tinit=1, tfinal=3, delta_t=1,
                           target_modules=TARGETS, learning_rate=1e-2)
    t = quiet_trainer(max_steps=12)
    t.fit(module, batch_loader(12))
    sched = scheduler_of(t)
    assert sched.skipped_steps == 1
    ema = {**sched.importance.exp_avg_ipt, **sched.importance.exp_avg_unc}
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in ema.values())
    assert sched.finalised and total_kept(module) == 2 * len(module.adapters)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_bf16_mixed_trains_and_logs_heatmaps(tiny_bert, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = adalora(tiny_bert)
    t = quiet_trainer(max_steps=10, precision="bf16-mixed", logger=TensorBoardLogger(tmp_path), log_every_n_steps=1)
    t.fit(module, batch_loader(10))
    sched = scheduler_of(t)
    assert sched.finalised and total_kept(module) == 2 * len(module.adapters)
    assert all(v.dtype == torch.float32 for v in sched.importance.exp_avg_ipt.values())
    assert torch.isfinite(t.callback_metrics["train/loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(t.logger.log_dir))).Reload()
    assert "rank/heatmap" in events.Tags()["images"]
    assert "train/budget" in events.Tags()["scalars"]
    assert any(tag.startswith("rank/bert.encoder.layer.0") for tag in events.Tags()["scalars"])


# ----------------------------------------------------------------- resume
def adapter_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if k in set(module.adapter_state_keys())}


def test_resume_mid_budget_phase_matches_uninterrupted_run(tiny_bert, tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        # T = 16 steps, 2 epochs of 8 batches; budget phase is steps 3..12, the checkpoint falls at step 8
        full = adalora(tiny_bert, tinit=2, tfinal=4)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{step}",
                               save_on_train_epoch_end=True)
        t1 = quiet_trainer(max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
        t1.fit(full, batch_loader(8))
        mid = tmp_path / "ckpt" / "step=8.ckpt"
        state = torch.load(mid, weights_only=False)
        sched_state = next(v for k, v in state["callbacks"].items() if "RankPruningScheduler" in k)
        assert sched_state["step"] == 8 and not sched_state["finalised"]
        kept_mid = sum(int(m.sum()) for m in sched_state["masks"].values())
        assert 2 * len(full.adapters) < kept_mid < 4 * len(full.adapters)  # really mid-budget

        resumed = adalora(tiny_bert, tinit=2, tfinal=4)
        t2 = quiet_trainer(max_epochs=2)
        t2.fit(resumed, batch_loader(8), ckpt_path=mid)
        assert t2.global_step == 16
        assert resumed.kept_ranks() == full.kept_ranks()
        a, b = adapter_tensors(full), adapter_tensors(resumed)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
        s1, s2 = scheduler_of(t1).importance, scheduler_of(t2).importance
        assert all(torch.equal(s1.exp_avg_unc[k], s2.exp_avg_unc[k]) for k in s1.exp_avg_unc)
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------- truncation of pruned triplets
def test_pruned_lambda_and_adam_moments_stay_zero_and_a_rekept_triplet_restarts_from_zero(tiny_bert):
    module = adalora(tiny_bert)
    probe = TruncationProbe()
    # T = 12: events at steps 2, 4, 6, 8 and the final one at 10; the first triplet is pruned at odd events, kept at
    # even ones (steps 4 and 8); the steps between events train with the masks fixed
    scheduler = RankPruningScheduler(tinit=1, tfinal=2, delta_t=2, importance=FlipFirstTriplet())
    quiet_trainer(max_steps=12, callbacks=[scheduler, probe]).fit(module, batch_loader(12))
    steps = probe.steps
    assert all(s["moments"] == 2 * len(module.adapters) for s in steps.values())  # AdamW's exp_avg, exp_avg_sq
    assert [t for t, s in steps.items() if s["pruned"]] == list(range(2, 13))
    # AdaLoRA: a pruned Λ entry and its moments are exactly 0 after every step, not only at events
    assert all(s["residue"] == 0.0 for s in steps.values()), {t: s["residue"] for t, s in steps.items()}
    assert probe.rekept_steps() == [4, 8]
    for t in probe.rekept_steps():
        assert steps[t]["first_lam"] == 0.0 and steps[t]["first_state"] == [0.0, 0.0], t  # restarts from 0
        assert steps[t + 1]["first_lam"] != 0.0, t  # and trains again


# ----------------------------------------------------------------- DDP
class RecordEvents(Callback):
    """Writes, per rank, the masks and importance EMAs at every masking event."""

    def __init__(self, folder: str) -> None:
        self.folder, self.events = folder, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sched = scheduler_of(trainer)
        step = trainer.global_step
        if sched.schedule.masks_at(step) or step == sched.schedule.final_step:
            units, state = pl_module.rank_units(), trainer.optimizers[0].state
            self.events[step] = {
                "masks": {n: u.mask.clone() for n, u in units.items()},
                "lam": {n: u.stored_lam.detach().clone() for n, u in units.items()},
                "moments": {n: torch.stack([state[u.stored_lam][k] for k in ("exp_avg", "exp_avg_sq")])
                            for n, u in units.items()},
                "ipt": {k: v.clone() for k, v in sched.importance.exp_avg_ipt.items()},
                "unc": {k: v.clone() for k, v in sched.importance.exp_avg_unc.items()},
            }

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(self.events, Path(self.folder) / f"rank{trainer.global_rank}.pt")


@pytest.mark.integration  # two processes
def test_ddp_two_processes_have_identical_masks_and_importance(tiny_bert, tmp_path):
    module = adalora(tiny_bert, tinit=1, tfinal=2, delta_t=1)
    recorder = RecordEvents(str(tmp_path))
    t = quiet_trainer(max_steps=8, strategy="ddp_spawn", devices=2, callbacks=[RankPruningScheduler(tinit=1, tfinal=2),
                                                                          recorder])
    t.fit(module, batch_loader(16))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sorted(r0) == sorted(r1) == list(range(2, 7))
    for step in r0:
        for kind in ("masks", "ipt", "unc", "lam", "moments"):
            assert r0[step][kind].keys() == r1[step][kind].keys()
            for key in r0[step][kind]:
                assert torch.equal(r0[step][kind][key], r1[step][kind][key]), (step, kind, key)
        for name, mask in r0[step]["masks"].items():  # the truncation followed the broadcast masks on both ranks
            assert r0[step]["lam"][name][mask == 0].eq(0).all() and r0[step]["moments"][name][:, mask == 0].eq(0).all()
    final = r0[6]["masks"]
    assert sum(int(m.sum()) for m in final.values()) == 2 * len(final)


# ----------------------------------------------------------------- the scheduler without a Trainer
def units_fixture(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    units = {}
    for i in range(3):
        p = torch.randn(5, 4, generator=g, requires_grad=True)
        lam = torch.randn(4, generator=g, requires_grad=True)
        q = torch.randn(4, 6, generator=g, requires_grad=True)
        units[f"layer.{i}.proj"] = RankUnit(p, lam, q, torch.ones(4))
    return units


def fake_step(units, seed):
    g = torch.Generator().manual_seed(seed)
    for u in units.values():
        for t in u.factors():
            t.grad = torch.randn(t.shape, generator=g)


def test_state_dict_round_trip_continues_exactly():
    units_a, units_b = units_fixture(), units_fixture()
    a = RankPruningScheduler(tinit=1, tfinal=2, delta_t=1, target_r=1)
    stub_a = scheduler_on_units(a, units_a, 10)
    for t in range(1, 5):
        fake_step(units_a, t)
        a.allocate(stub_a, t)
    state = a.state_dict()
    assert set(state["masks"]) == set(units_a) and state["step"] == 0  # step is set by the Trainer hook
    b = RankPruningScheduler(tinit=1, tfinal=2, delta_t=1, target_r=1)
    stub_b = scheduler_on_units(b, units_b, 10)
    b.load_state_dict(state)
    for name, unit in units_b.items():
        unit.mask.copy_(state["masks"][name])
    for t in range(5, 11):
        fake_step(units_a, t), fake_step(units_b, t)
        a.allocate(stub_a, t), b.allocate(stub_b, t)
    assert a.finalised and b.finalised
    assert all(torch.equal(units_a[n].mask, units_b[n].mask) for n in units_a)
    assert sum(int(u.mask.sum()) for u in units_a.values()) == 3


def test_module_without_rank_units_is_a_clear_error():
    with pytest.raises(TypeError, match="rank_units"):
        RankPruningScheduler.units(nn.Linear(2, 2))


def test_scheduler_argument_errors():
    with pytest.raises(ValueError, match="delta_t"):
        RankPruningScheduler(delta_t=0)
    with pytest.raises(ValueError, match="beta1"):
        RankPruningScheduler(beta1=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RankPruningScheduler(tfinal=2.0)
    with pytest.raises(ValueError, match="target_r must be >= 0"):
        RankPruningScheduler(target_r=-1)


def test_a_module_without_settings_needs_target_r_on_the_scheduler():
    with pytest.raises(ValueError, match=r"needs target_r: UnitsModule has no AdaLoRA settings"):
        scheduler_on_units(RankPruningScheduler(), units_fixture(), 10)
