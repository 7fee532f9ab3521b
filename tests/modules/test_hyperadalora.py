"""HyperAdaLoRAModule / HyperLoRAModule: step-0 equality with AdaLoRA / LoRA on the same base factors, pruning of
the generated Λ through AdaLoRA's own scheduler, importance on generated tensors, resume, DDP, PEFT exports."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForSequenceClassification

from tests.helpers import FlipFirstTriplet, TruncationProbe, random_batch
from lora_lightning.adapters.hyper import HyperSVDLinear
from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.adapters.svd import SVDLinear
from lora_lightning.callbacks import RankPruningScheduler
from lora_lightning.callbacks.hypernet_warmup import HypernetWarmup
from lora_lightning.export import export_peft
from lora_lightning.modules import AdaLoRAModule, LoRAModule
from lora_lightning.modules.hyperadalora import HyperAdaLoRAModule, HyperLoRAModule

TARGETS = ["query", "key", "value", "dense"]
MODES = ["residual", "recurrent", "seeded"]
SCHEDULE = dict(init_r=4, target_r=2, alpha=8.0, tinit=2, tfinal=2, delta_t=1, target_modules=TARGETS)


def loader(n: int, seed: int = 0):
    return torch.utils.data.DataLoader([random_batch(seed=seed + i) for i in range(n)], batch_size=None)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False, enable_model_summary=False,
                    enable_checkpointing=False, default_root_dir=tmp_path, deterministic=True)
    return L.Trainer(**{**defaults, **kwargs})


def hyper(tiny_bert, mode="residual", seed=0, **kwargs) -> HyperAdaLoRAModule:
    torch.manual_seed(seed)
    return HyperAdaLoRAModule(backbone=tiny_bert, mode=mode, hypernet_hidden=16, hypernet_heads=2,
                              **{**SCHEDULE, **kwargs})


def adapter_state(module) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {key: state[key].detach().clone() for key in module.adapter_state_keys()}


def batch_inputs(seed=0):
    return {k: v for k, v in random_batch(seed=seed).items() if k != "labels"}


@pytest.mark.parametrize("mode, options", [(m, {}) for m in MODES] + [
    ("residual", dict(hypernet_tokens="triplet")), ("residual", dict(hypernet_scaling="gains")),
    ("residual", dict(hypernet_tokens="triplet", hypernet_scaling="grad_rms"))])
def test_init_equals_adalora_with_the_same_base_factors(tiny_bert, mode, options):
    torch.manual_seed(0)
    ada = AdaLoRAModule(backbone=tiny_bert, **SCHEDULE).eval()
    with torch.no_grad():  # non-zero Λ and a partial mask, or the equality would be trivial
        for i, layer in enumerate(ada.adapters.values()):
            layer.lora_lambda.normal_()
            layer.rank_mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]).roll(i))
    module = hyper(tiny_bert, mode, **options).eval()
    assert (module.hypernet.tokens, module.hypernet.scaling) == (options.get("hypernet_tokens", "factor"),
                                                                 options.get("hypernet_scaling", "none"))
    with torch.no_grad():
        for name, layer in module.adapters.items():
            for key in ("lora_P", "lora_lambda", "lora_Q", "rank_mask"):
                getattr(layer, key).copy_(getattr(ada.adapters[name], key))
        module.backbone.classifier.load_state_dict(ada.backbone.classifier.state_dict())
        expected = ada(batch_inputs()).logits
        assert not torch.allclose(expected, AutoModelForSequenceClassification.from_pretrained(tiny_bert).eval()(
            **batch_inputs()).logits)
        torch.testing.assert_close(module(batch_inputs()).logits, expected, rtol=1e-6, atol=1e-6)
    assert all(isinstance(layer, HyperSVDLinear) for layer in module.adapters.values())
    trainable_base = [n for n, p in module.backbone.named_parameters() if p.requires_grad and "lora_" in n]
    assert bool(trainable_base) == (mode == "residual")


def test_fit_prunes_generated_lambda_with_adalora_scheduler(tiny_bert):
    module = hyper(tiny_bert, "residual", hypernet_warmup=3)
    fit = trainer(max_steps=8)
    fit.fit(module, loader(8))
    kinds = [type(cb) for cb in fit.callbacks]
    assert RankPruningScheduler in kinds and HypernetWarmup in kinds
    pattern = module.kept_ranks()
    assert sum(pattern.values()) == 2 * len(pattern)  # exactly the target budget
    assert [g["name"] for g in fit.optimizers[0].param_groups] == ["adapters", "hypernet"]
    # the mask multiplies the generated Λ
    layer = next(iter(module.adapters.values()))
    _, masked, _ = layer.factors()
    raw = layer.generated()["lora_lambda"]
    torch.testing.assert_close(masked, raw * layer.rank_mask)
    assert (raw[layer.rank_mask == 0] != 0).any() or layer.rank_mask.all()
    # the generators trained
    assert all(p.abs().sum() > 0 for g in module.hypernet.generators.values() for p in
               [proj.weight for proj in g.out_proj.values()])


@pytest.mark.parametrize("mode", ["residual", "recurrent"])
def test_pruning_zeroes_the_base_lambda_and_its_moments_at_every_event(tiny_bert, mode):
    module = hyper(tiny_bert, mode)
    probe = TruncationProbe()
    # T = 12: events at steps 2, 4, 6, 8, final at 10; the first triplet is pruned at odd events, kept at even ones
    scheduler = RankPruningScheduler(tinit=1, tfinal=2, delta_t=2, importance=FlipFirstTriplet())
    trainer(max_steps=12, callbacks=[scheduler, probe]).fit(module, loader(12))
    steps = probe.steps
    assert all(s["moments"] == (2 * len(module.adapters) if mode == "residual" else 0) for s in steps.values())
    events = [t for t, s in steps.items() if s["event"]]
    assert events == [2, 4, 6, 8, 10]
    assert all(steps[t]["residue"] == 0.0 for t in events), {t: steps[t]["residue"] for t in events}
    assert probe.rekept_steps() == [4, 8]
    for t in probe.rekept_steps():  # kept again: its base entry restarts from 0 (the generated Λ from G alone)
        assert steps[t]["first_lam"] == 0.0 and all(v == 0.0 for v in steps[t]["first_state"]), t


def test_rank_units_are_generated_tensors_with_step_gradients_and_orth_reg_trains_generators(tiny_bert):
    module = hyper(tiny_bert, "seeded")
    with torch.no_grad():
        for g in module.hypernet.generators.values():
            for proj in g.out_proj.values():
                proj.weight.normal_(std=0.01)
    batch = random_batch()
    loss = module.task.loss(module(batch), batch)
    losses = module.extra_losses()
    (loss + losses["orth_reg"]).backward()
    units = module.rank_units()
    generated = module.hypernet.generate()
    for (name, unit), values, grads in zip(units.items(), generated, module.hypernet.generated_grads):
        assert unit.mask is module.adapters[name].rank_mask
        torch.testing.assert_close(unit.P, values["lora_P"])
        torch.testing.assert_close(unit.lam, values["lora_lambda"])
        assert unit.P.grad is grads["lora_P"] and unit.Q.grad is grads["lora_Q"] and unit.lam.grad is not None
        assert unit.lam.grad.abs().sum() > 0
    # seeded: base factors are buffers, so every gradient (task and orth reg) reaches only the generators
    assert not [n for n, p in module.backbone.named_parameters() if p.requires_grad and "lora_" in n]
    orth_only = module.extra_losses()["orth_reg"]
    grads = torch.autograd.grad(orth_only, list(module.hypernet.generators["lora_P"].parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode, options", [("recurrent", {}), ("residual", {}),
                                           ("residual", dict(hypernet_fold_at=3, hypernet_warmup=0)),  # fold < ckpt
                                           ("residual", dict(hypernet_fold_at=6, hypernet_warmup=0))])
def test_resume_equals_uninterrupted_run(tiny_bert, tmp_path, mode, options):
    options = {"hypernet_warmup": 3, **options}
    full = hyper(tiny_bert, mode, **options)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path, max_steps=8, enable_checkpointing=True, callbacks=[saver]).fit(full, loader(4))
    resumed = hyper(tiny_bert, mode, seed=1, **options)  # another init: everything must come from the file
    resumed_trainer = trainer(tmp_path, max_steps=8)
    resumed_trainer.fit(resumed, loader(4), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert resumed_trainer.global_step == 8
    assert resumed.hypernet.folded == full.hypernet.folded == ("hypernet_fold_at" in options)
    a, b = adapter_state(full), adapter_state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("hypernet.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    for x, y in zip(full.hypernet.generate(), resumed.hypernet.generate()):
        for key in x:
            torch.testing.assert_close(y[key], x[key], atol=1e-6, rtol=1e-5)


class SaveGenerated(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            generated = pl_module.hypernet.generate()
        state = {f"{n}.{k}": v.clone() for n, g in zip(pl_module.hypernet.layer_names, generated) for k, v in g.items()}
        state.update({f"{n}.mask": layer.rank_mask.clone() for n, layer in pl_module.adapters.items()})
        torch.save(state, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.integration
def test_ddp_two_processes_generate_identical_factors_and_masks(tiny_bert, tmp_path):
    module = hyper(tiny_bert, "recurrent", hypernet_warmup=2)
    fit = trainer(tmp_path, strategy="ddp_spawn", devices=2, max_steps=6, callbacks=[SaveGenerated(str(tmp_path))])
    fit.fit(module, loader(12))  # a DistributedSampler gives each rank other batches
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    masks = torch.cat([v for k, v in rank0.items() if k.endswith(".mask")])
    assert masks.sum() == 2 * len(module.adapters)  # pruned to the target on both ranks


def trained(module, steps=4):
    trainer(max_steps=steps).fit(module, loader(steps))
    return module.eval()


@pytest.mark.parametrize("fmt", ["adalora", "lora"])
def test_materialised_export_loads_in_peft_with_equal_logits(tiny_bert, tmp_path, fmt):
    from peft import PeftModel

    module = trained(hyper(tiny_bert, "recurrent", hypernet_warmup=0, tinit=1, tfinal=1), steps=5)
    with torch.no_grad():
        before = module(batch_inputs()).logits
    module.materialize()
    assert module.hypernet is None and all(type(layer) is SVDLinear for layer in module.adapters.values())
    assert sum(module.kept_ranks().values()) == 2 * len(module.adapters)
    folder = export_peft(module, tmp_path / fmt, format=fmt)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == fmt.upper()
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(batch_inputs()).logits, before, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loaded(**batch_inputs()).logits, before, atol=1e-5, rtol=1e-5)


def test_hyperlora_init_equals_lora_and_exports(tiny_bert, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    lora = LoRAModule(backbone=tiny_bert, rank=4, target_modules=TARGETS).eval()
    with torch.no_grad():
        for layer in lora.adapters.values():
            layer.lora_B.normal_(std=0.1)
    torch.manual_seed(0)
    module = HyperLoRAModule(backbone=tiny_bert, rank=4, target_modules=TARGETS, hypernet_hidden=16, hypernet_heads=2)
    module.load_state_dict({k: v for k, v in lora.state_dict().items() if k in set(lora.adapter_state_keys())} |
                           {k: v for k, v in module.state_dict().items() if k.startswith("hypernet.")})
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(batch_inputs()).logits, lora(batch_inputs()).logits, rtol=1e-6, atol=1e-6)
    trained(module.train(), steps=3)
    with torch.no_grad():
        before = module(batch_inputs()).logits
    module.materialize()
    assert all(type(layer) is LoRALinear for layer in module.adapters.values())
    folder = export_peft(module, tmp_path / "hyperlora", format="lora")
    loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch_inputs()).logits, before, atol=1e-5, rtol=1e-5)


def test_bad_mode_fails_at_construction(tiny_bert):
    with pytest.raises(ValueError, match="Unknown hypernet mode"):
        hyper(tiny_bert, "sideways")


@pytest.mark.parametrize("hypernet_lr, expected", [(None, 0.1 * 4e-3), (2e-3, 2e-3)])
def test_hypernet_param_group_learning_rate(tiny_bert, hypernet_lr, expected):
    module = hyper(tiny_bert, "residual", learning_rate=4e-3, hypernet_lr=hypernet_lr)
    groups = {g["name"]: g for g in module.param_groups()}
    assert groups["hypernet"]["lr"] == pytest.approx(expected)
    assert {id(p) for p in groups["hypernet"]["params"]} == {id(p) for p in module.hypernet.parameters()}


class RecordFold(Callback):
    """After each step: whether the hypernet is folded, a generator weight and a base factor."""

    def __init__(self) -> None:
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        layer = next(iter(pl_module.adapters.values()))
        self.rows.append((trainer.global_step, pl_module.hypernet.folded,
                          pl_module.hypernet.generators["lora_lambda"].out_proj["1"].weight.detach().clone(),
                          layer.lora_P.detach().clone()))


def test_fold_keeps_outputs_and_takes_generators_out_of_the_step(tiny_bert):
    module = hyper(tiny_bert, hypernet_fold_at=3, hypernet_warmup=0)
    record = RecordFold()
    trainer(max_steps=6, callbacks=[record]).fit(module, loader(6))
    assert [(step, folded) for step, folded, *_ in record.rows] == [(1, False), (2, False), (3, True), (4, True),
                                                                       (5, True), (6, True)]
    weights = [w for *_, w, _ in record.rows]
    assert not torch.equal(weights[0], weights[1])  # the generator trained before the fold ...
    assert all(torch.equal(w, weights[2]) for w in weights[2:])  # ... and is out of the step after it
    assert not torch.equal(record.rows[-1][3], record.rows[2][3])  # the plain factors go on training
    assert all(p.grad is None for p in module.hypernet.parameters())
    layer = next(iter(module.adapters.values()))
    assert layer.generated()["lora_P"] is layer.lora_P  # the adapters read their base factors

    # folding leaves the model's output unchanged (on a model folded by hand, from a trained unfolded state)
    unfolded = hyper(tiny_bert, hypernet_fold_at=10, hypernet_warmup=0)
    trainer(max_steps=5).fit(unfolded, loader(5))
    assert not unfolded.hypernet.folded
    unfolded.train()
    with torch.no_grad():
        before = unfolded(batch_inputs(7)).logits
    unfolded.hypernet.fold()
    with torch.no_grad():
        after = unfolded(batch_inputs(7)).logits
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_front_loaded_hypernet_lr_decays_to_zero_at_the_fold():
    warmup = HypernetWarmup(warmup_steps=0)
    warmup.resolved_steps, warmup.decay_steps = 0, 4
    assert [warmup.factor(t) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    warmup.resolved_steps = 2  # a ramp composes with the decay
    assert [warmup.factor(t) for t in range(3)] == [0.5, 0.75, 0.5]


def test_fold_needs_residual_mode(tiny_bert):
    with pytest.raises(ValueError, match="hypernet_fold_at .* needs mode='residual', not 'recurrent'"):
        hyper(tiny_bert, "recurrent", hypernet_fold_at=2)


class RecordGroupLR(Callback):
    """Each param group's LR as the optimiser applied it (a step post-hook)."""

    def __init__(self) -> None:
        self.applied: list[dict[str, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(
            lambda opt, *_: self.applied.append({g["name"]: g["lr"] for g in opt.param_groups}))


def test_adalora_lambda_boost_control_gets_the_boosted_lr_for_exactly_the_boost_steps(tiny_bert):
    torch.manual_seed(0)
    module = AdaLoRAModule(backbone=tiny_bert, learning_rate=1e-3, lambda_lr_boost=1.0, lambda_boost_steps=3,
                           **{**SCHEDULE, "tinit": 1, "tfinal": 1})
    module.lr_scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    groups = {g["name"]: g["params"] for g in module.param_groups()}
    lams = [layer.lora_lambda for layer in module.adapters.values()]
    assert [id(p) for p in groups["lambda"]] == [id(p) for p in lams]
    assert not {id(p) for p in lams} & {id(p) for p in groups["adapters"]}
    record = RecordGroupLR()
    trainer(max_steps=5, callbacks=[record]).fit(module, loader(5))
    assert [round(r["lambda"], 10) for r in record.applied] == [2e-3, round(1e-3 * (1 + 2 / 3), 10),
                                                                 round(1e-3 * (1 + 1 / 3), 10), 1e-3, 1e-3]
    assert all(r["adapters"] == 1e-3 for r in record.applied)
    assert {g["name"]: g["lr"] for g in module.trainer.optimizers[0].param_groups}["lambda"] == 1e-3  # restored
    assert [g["name"] for g in AdaLoRAModule(backbone=tiny_bert, **SCHEDULE).param_groups()] == ["adapters"]
