"""AdaLoRAModule: parity of the rank allocation with PEFT's RankAllocator, the deliberate differences, the
self-installed scheduler, losses and logging, bad input, and PEFT exports that load with equal logits."""
from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tests.helpers import batch_loader, quiet_trainer, random_batch, scheduler_on_units
from lora_lightning.allocation.budget import top_b_masks
from lora_lightning.allocation.importance import ImportanceTracker, RankUnit
from lora_lightning.callbacks import RankPruningScheduler
from lora_lightning.export import export_peft
from lora_lightning.modules import AdaLoRAModule

peft = pytest.importorskip("peft")
TARGETS = ["query", "key", "value", "dense"]




# ----------------------------------------------------------------- parity with PEFT
def peft_adalora(tiny_bert, **config):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    cfg = AdaLoraConfig(target_modules=TARGETS, task_type="SEQ_CLS", lora_alpha=8, **config)
    return get_peft_model(model, cfg)


def peft_units(peft_model) -> dict[str, RankUnit]:
    """PEFT's adapters seen through our interface: lora_B = P, lora_E = Λ, lora_A = Q; masks are our own. No
    ``stored_lam``: our allocator only observes PEFT's trajectory (our truncation would change the Λ and moments
    PEFT scores next; PEFT zeroes pruned Λ itself), so masks can be compared at every event."""
    units = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            e = module.lora_E["default"]
            units[name] = RankUnit(module.lora_B["default"], e, module.lora_A["default"], torch.ones(e.shape[0]))
    return units


def peft_keep(rank_pattern: dict, name: str) -> list[float]:
    return [float(v) for v in rank_pattern[f"{name}.lora_E.default"]]


def test_kept_triplets_equal_peft_rank_allocator_on_the_same_weights_and_grads(tiny_bert):
    T, tinit, tfinal, delta_t = 24, 3, 5, 2
    model = peft_adalora(tiny_bert, init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=T)
    units = peft_units(model)
    scheduler = RankPruningScheduler(tinit=tinit, tfinal=tfinal, delta_t=delta_t, target_r=2)
    stub = scheduler_on_units(scheduler, units, T)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    config = model.peft_config["default"]
    events = 0
    for t in range(1, T + 1):
        model(**random_batch(seed=t)).loss.backward()
        optimizer.step()
        changed = scheduler.allocate(stub, t)  # ours first: PEFT zeroes Λ in place when it masks
        model.base_model.update_and_allocate(t)
        optimizer.zero_grad()
        if changed:
            events += 1
            for name, unit in units.items():
                assert unit.mask.tolist() == peft_keep(config.rank_pattern, name), (t, name)
    assert events == len(range(4, 19, 2)) + 1  # budget-phase events at even t in (tinit, T - tfinal), then final
    assert scheduler.finalised
    for name, unit in units.items():  # PEFT re-applies the same final pattern until the end
        assert unit.mask.tolist() == peft_keep(config.rank_pattern, name)
    assert sum(int(u.mask.sum()) for u in units.values()) == 2 * len(units)
    # the pattern is not uniform: ranks were really reallocated between modules
    assert len({int(u.mask.sum()) for u in units.values()}) > 1


def test_difference_ties_peft_prunes_all_tied_triplets_we_keep_exactly_b(tiny_bert):
    model = peft_adalora(tiny_bert, init_r=4, target_r=2, total_step=10)
    allocator = model.base_model.rankallocator
    inner = model.base_model.model
    model(**random_batch()).loss.backward()
    allocator.update_ipt(inner)
    for key in allocator.exp_avg_ipt:  # every entry scores the same
        allocator.exp_avg_ipt[key].fill_(1.0), allocator.exp_avg_unc[key].fill_(1.0)
    budget = allocator.init_bgt // 2
    pattern = allocator.mask_to_budget(inner, budget)
    assert sum(sum(v) for v in pattern.values()) == 0  # PEFT: "<= threshold" drops every tied triplet
    scores = {n: torch.full((4,), 3.0) for n in peft_units(model)}
    ours = top_b_masks(scores, budget)
    assert sum(int(m.sum()) for m in ours.values()) == budget
    with pytest.raises(RuntimeError):  # PEFT cannot mask when nothing is to be pruned (k = 0)
        allocator.mask_to_budget(inner, allocator.init_bgt)
    assert all(m.all() for m in top_b_masks(scores, allocator.init_bgt).values())


def test_difference_non_finite_step_poisons_peft_but_is_skipped_by_us(tiny_bert):
    model = peft_adalora(tiny_bert, init_r=4, target_r=2, total_step=10)
    allocator, inner, units = model.base_model.rankallocator, model.base_model.model, peft_units(model)
    ours, reference = ImportanceTracker(), ImportanceTracker()
    for t in range(1, 5):
        model.zero_grad()
        model(**random_batch(seed=t)).loss.backward()
        if t == 2:
            next(iter(units.values())).lam.grad[0] = float("nan")
        else:
            reference.update(units)
        assert ours.update(units) == (t != 2)
        allocator.update_ipt(inner)
    peft_poisoned = any(not torch.isfinite(v).all() for v in allocator.exp_avg_ipt.values())
    assert peft_poisoned
    ours_scores, ref_scores = ours.triplet_scores(units), reference.triplet_scores(units)
    assert all(torch.isfinite(s).all() for s in ours_scores.values())
    # our state equals that of a run without the bad step: the only difference is the skip
    assert all(torch.equal(ours_scores[n], ref_scores[n]) for n in units)


# ----------------------------------------------------------------- the module
def test_forward_equals_backbone_at_init_and_units_cover_every_adapter(tiny_bert):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, target_modules=TARGETS)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()
    batch = random_batch()
    module.eval()
    batch_in = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.allclose(module(batch_in).logits, base(**batch_in).logits, atol=1e-6)
    units = module.rank_units()
    assert list(units) == list(module.adapters) and len(units) == 13
    assert all(u.lam.is_leaf and u.mask is module.adapters[n].rank_mask for n, u in units.items())


def test_fit_prunes_to_exact_target_logs_losses_and_writes_rank_pattern(tiny_bert, tmp_path):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, tinit=2, tfinal=3, delta_t=2,
                           target_modules=TARGETS, learning_rate=1e-2)
    t = quiet_trainer(max_steps=14, default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(module, batch_loader(14), batch_loader(2, seed=100))
    schedulers = [cb for cb in t.callbacks if isinstance(cb, RankPruningScheduler)]
    assert len(schedulers) == 1 and schedulers[0].finalised and schedulers[0].step == 14
    ranks = module.kept_ranks()
    assert sum(ranks.values()) == 2 * len(ranks)
    written = json.loads((tmp_path / "checkpoints" / "rank_pattern.json").read_text())  # beside the checkpoints
    assert written["rank_pattern"] == ranks and written["final"] is True
    metrics = t.callback_metrics
    assert metrics["train/budget"].item() == 2 * len(ranks)
    assert metrics["train/loss"].item() == pytest.approx(
        metrics["train/task_loss"].item() + metrics["train/orth_reg"].item(), rel=1e-5)
    # validation loss is the task loss alone
    module.eval()
    expected = sum(module.task.loss(module(b), b).item() for b in batch_loader(2, seed=100)) / 2
    assert t.validate(module, batch_loader(2, seed=100), verbose=False)[0]["val/loss"] == pytest.approx(expected, rel=1e-5)


def test_user_configured_scheduler_is_kept(tiny_bert):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, target_modules=["query"])
    mine = RankPruningScheduler(tinit=1, tfinal=1)
    t = quiet_trainer(max_steps=4, callbacks=[mine])
    t.fit(module, batch_loader(4))
    assert [cb for cb in t.callbacks if isinstance(cb, RankPruningScheduler)] == [mine]
    assert mine.finalised and sum(module.kept_ranks().values()) == 2 * 2


def test_a_configured_scheduler_overrides_only_the_options_it_sets(tiny_bert):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=2, beta1=0.7,
                           target_modules=["query"])
    mine = RankPruningScheduler(tfinal=1, target_r=1)
    quiet_trainer(max_steps=6, callbacks=[mine]).fit(module, batch_loader(6))
    assert mine.settings == replace(module.settings, tfinal=1, target_r=1)
    assert (mine.schedule.tinit, mine.schedule.tfinal, mine.schedule.delta_t) == (1, 1, 2)
    assert mine.importance.beta1 == 0.7 and sum(module.kept_ranks().values()) == 1 * 2
    assert module.run_settings == replace(module.settings, total_step=6)  # the module's own, steps resolved


def test_equal_ranks_warn_once_and_never_prune(tiny_bert):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=3, target_r=3, target_modules=["query"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=3).fit(module, batch_loader(3))
    assert len([w for w in caught if "nothing to prune" in str(w.message)]) == 1
    assert all(r == 3 for r in module.kept_ranks().values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_r=4, target_r=6), "cannot exceed init_r"),
        (dict(delta_t=0), "delta_t"),
        (dict(beta1=1.0), "beta1"),
        (dict(beta2=-0.5), "beta2"),
        (dict(tinit=5, tfinal=5, total_step=10), "does not fit the run"),
        (dict(tinit=1.2), r"\[0, 1\)"),
    ],
)
def test_bad_input_is_rejected_at_construction(tiny_bert, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaLoRAModule(backbone=tiny_bert, target_modules=["query"], **kwargs)


def test_schedule_that_does_not_fit_the_trainer_run_fails_before_training(tiny_bert):
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, tinit=3, tfinal=3, target_modules=["query"])
    before = {k: v.clone() for k, v in module.state_dict().items() if "lora_" in k}
    t = quiet_trainer(max_steps=6)
    with pytest.raises(ValueError, match="does not fit the run"):
        t.fit(module, batch_loader(6))
    assert t.global_step == 0
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------- exports
def pruned_module(tiny_bert) -> AdaLoRAModule:
    torch.manual_seed(3)
    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, alpha=8.0, target_modules=TARGETS)
    with torch.no_grad():
        for i, layer in enumerate(module.adapters.values()):
            layer.lora_lambda.normal_()
            layer.rank_mask.copy_(torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]][i % 3]))
        module.backbone.classifier.weight.normal_()
    return module.eval()


@pytest.mark.parametrize("fmt", ["adalora", "lora"])
def test_peft_export_loads_with_equal_logits(tiny_bert, tmp_path, fmt):
    from peft import PeftModel

    module = pruned_module(tiny_bert)
    folder = export_peft(module, tmp_path / fmt, format=fmt)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == fmt.upper()
    if fmt == "lora":  # modules pruned to rank 0 are left out
        assert len(config["rank_pattern"]) == len([r for r in module.kept_ranks().values() if r > 0])
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), folder).eval()
    batch = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        ours, theirs = module(batch).logits, loaded(**batch).logits
    assert not torch.allclose(ours, AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()(**batch).logits)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_peft_export_writes_the_runs_settings_with_resolved_steps(tiny_bert, tmp_path):
    from peft import PeftConfig

    from lora_lightning.export import export_checkpoint

    module = AdaLoRAModule(backbone=tiny_bert, init_r=4, target_r=2, tinit=0.25, tfinal=0.25, delta_t=2, beta1=0.8,
                           beta2=0.9, orth_reg_weight=0.1, target_modules=["query"])
    t = quiet_trainer(max_steps=8, default_root_dir=tmp_path, enable_checkpointing=True)
    t.fit(module, batch_loader(8))
    expected = {"target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 2, "beta1": 0.8, "beta2": 0.9,
                "orth_reg_weight": 0.1, "total_step": 8}
    live = json.loads((export_peft(module, tmp_path / "live", format="adalora") / "adapter_config.json").read_text())
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    export_checkpoint(checkpoint, tmp_path / "from-ckpt", format="adalora")  # the run's steps travel in the file
    saved = json.loads((tmp_path / "from-ckpt" / "adapter_config.json").read_text())
    for config in (live, saved):
        assert {key: config[key] for key in expected} == expected and config["init_r"] == 4
    assert PeftConfig.from_pretrained(tmp_path / "from-ckpt").total_step == 8  # PEFT accepts the schedule
