"""The factor hypernetwork on a toy model: step-0 equivalence, modes, caching and autograd, materialisation."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lightning.adapters.base import adapter_layers, disable_adapters, inject_adapters
from lora_lightning.adapters.hyper import (
    AdapterHypernet,
    HyperLoRALinear,
    HyperSVDLinear,
    TripletGenerator,
    _NormalizeGradPerMatrix,
)
from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.adapters.svd import SVDLinear


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        x = x + self.query(x)
        return x + self.down(torch.tanh(self.up(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


def build(kind: str = "svd", mode: str = "residual", seed: int = 0, rank: int = 4, **options):
    torch.manual_seed(seed)
    model = Toy().requires_grad_(False)
    cls = {"svd": HyperSVDLinear, "lora": HyperLoRALinear}[kind]
    inject_adapters(model, ["query", "up", "down"], lambda name, layer: cls(layer, rank=rank, alpha=8.0))
    for layer in adapter_layers(model).values():
        if kind == "svd":  # Λ = 0 at AdaLoRA's init would hide P and Q: give them values
            layer.lora_lambda.data.normal_()
        else:
            layer.lora_B.data.normal_(std=0.1)
    plain_copy = copy.deepcopy(model)
    hyper = AdapterHypernet(adapter_layers(model), mode=mode, hidden=16, heads=2, **options)
    return model, hyper, plain_copy


def plain_equivalent(hyper_copy: nn.Module, kind: str) -> nn.Module:
    """The same model with plain SVDLinear / LoRALinear layers holding the same base factors."""
    plain = copy.deepcopy(hyper_copy)
    for name, layer in adapter_layers(plain).items():
        cls = SVDLinear if kind == "svd" else LoRALinear
        new = cls(layer.base_layer, layer.max_rank if kind == "svd" else layer.rank, layer.alpha)
        for fname in type(layer).GENERATED:
            getattr(new, fname).data.copy_(getattr(layer, fname))
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent), child, new)
    return plain


def train_steps(model, hyper, steps=3, lr=1e-2, seed=1):
    params = [p for p in list(model.parameters()) + list(hyper.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        hyper.recurrent_update()
    return opt


def test_matrix_embedding_ids_come_from_module_positions():
    _, hyper, _ = build()
    assert hyper.layer_names == ["layer.0.query", "layer.0.up", "layer.0.down",
                                 "layer.1.query", "layer.1.up", "layer.1.down"]
    assert hyper.layer_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert hyper.type_ids.tolist() == [1, 2, 0, 1, 2, 0]  # sorted vocabulary: down, query, up


def test_generator_block_is_torch_pre_norm_encoder_layer_without_dropout():
    _, hyper, _ = build()
    block = hyper.generators["lora_P"].block
    assert isinstance(block, nn.TransformerEncoderLayer) and block.norm_first and block.self_attn.batch_first
    assert block.dropout.p == block.dropout1.p == block.dropout2.p == 0.0
    with pytest.raises(ValueError, match="not divisible by its 3 heads"):
        AdapterHypernet(adapter_layers(build()[0]), hidden=16, heads=3)


@pytest.mark.parametrize("kind", ["svd", "lora"])
@pytest.mark.parametrize("mode", ["residual", "recurrent", "seeded"])
def test_step_zero_equals_plain_adapter(kind, mode):
    model, hyper, before = build(kind, mode)
    plain = plain_equivalent(before, kind)
    x = torch.randn(3, 8)
    expected = plain(x)
    with disable_adapters(plain):
        assert not torch.allclose(plain(x), expected)  # the adapters do contribute
    # the same factors (bit for bit, below); outputs up to matmul memory layout
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    for name, layer in adapter_layers(model).items():
        generated = layer.generated()
        for fname in type(layer).GENERATED:
            torch.testing.assert_close(generated[fname], getattr(adapter_layers(plain)[name], fname), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["residual", "recurrent", "seeded"])
def test_trainable_set_per_mode(mode):
    model, hyper, _ = build("svd", mode)
    layer_params = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "residual":
        assert layer_params == {
            f"layer.{i}.{m}.{f}" for i in range(2) for m in ("query", "up", "down")
            for f in ("lora_P", "lora_lambda", "lora_Q")
        }
    else:
        assert layer_params == set()
        buffers = {n for n, _ in model.named_buffers()}
        assert "layer.0.query.lora_P" in buffers and "layer.1.down.lora_lambda" in buffers
        assert "layer.0.query.lora_P" in model.state_dict()  # saved, so resume is exact
    # every generator (P, Λ, Q) is trainable and receives a gradient once Λ is non-zero
    assert set(hyper.generators) == {"lora_P", "lora_lambda", "lora_Q"}
    model(torch.randn(2, 8)).pow(2).mean().backward()
    for fname, generator in hyper.generators.items():
        for proj in generator.out_proj.values():
            assert proj.weight.grad.abs().sum() > 0, fname


@pytest.mark.parametrize("mode", ["residual", "recurrent", "seeded"])
def test_modes_update_the_right_tensors(mode):
    model, hyper, before = build("svd", mode)
    base0 = {n: t.clone() for n, t in model.state_dict().items() if "lora_" in n}
    train_steps(model, hyper, steps=2)
    base1 = {n: t for n, t in model.state_dict().items() if "lora_" in n}
    changed = {n for n in base0 if not torch.equal(base0[n], base1[n])}
    if mode == "seeded":
        assert changed == set()
    else:
        assert changed == set(base0)
    # the generators moved away from zero: generated factors now differ from the base factors
    layer = model.layer[0].query
    assert not torch.allclose(layer.generated()["lora_Q"], layer.lora_Q)


def test_recurrent_update_writes_generated_factors():
    model, hyper, _ = build("svd", "recurrent")
    train_steps(model, hyper, steps=2)  # generators non-zero now
    x = torch.randn(5, 8)
    loss = model(x).pow(2).mean()
    generated = [{k: v.detach().clone() for k, v in layer.generated().items()} for layer in hyper.layers]
    loss.backward()
    for layer, g in zip(hyper.layers, generated):
        assert not torch.equal(layer.lora_P, g["lora_P"])
    hyper.recurrent_update()  # no optimiser step in between: the base becomes exactly what this step generated
    for layer, g in zip(hyper.layers, generated):
        for fname, value in g.items():
            torch.testing.assert_close(getattr(layer, fname), value, rtol=0, atol=0)
    # and the next generation applies the generator to the new base
    layer = hyper.layers[0]
    with torch.no_grad():
        expected_next = layer.lora_Q + hyper.generators["lora_Q"](
            layer.lora_Q.unsqueeze(0), hyper.layer_ids[:1], hyper.type_ids[:1]
        )[0]
        torch.testing.assert_close(layer.generated()["lora_Q"], expected_next)


def test_generation_cached_once_per_step_and_accumulation_exact(monkeypatch):
    model, hyper, _ = build("svd", "residual")
    train_steps(model, hyper, steps=2)
    calls = []
    original = hyper._generate
    monkeypatch.setattr(hyper, "_generate", lambda: calls.append(1) or original())
    x = torch.randn(6, 8)
    params = [p for p in list(model.parameters()) + list(hyper.parameters()) if p.requires_grad]

    # full batch, one backward
    model(x).pow(2).sum().backward()
    assert len(calls) == 1  # six adapted matrices, one generation
    full = [p.grad.clone() for p in params]
    full_generated = {k: v.clone() for k, v in hyper.generated_grads[0].items()}
    for p in params:
        p.grad = None
    hyper.zero_generated_grads()  # like p.grad = None (an optimiser step does this by itself, see below)

    # two micro-batches: regenerated once each (the first backward consumed the graph), same gradients
    calls.clear()
    model(x[:3]).pow(2).sum().backward()
    model(x[3:]).pow(2).sum().backward()
    assert len(calls) == 2
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad, g)
    for k, v in full_generated.items():
        torch.testing.assert_close(hyper.generated_grads[0][k], v)

    # several forwards before one backward share one generation; eval reuses its cache until a step
    calls.clear()
    loss = model(x).sum() + model(x).sum()
    assert len(calls) == 1
    loss.backward()
    with torch.no_grad():
        model(x), model(x)
    assert len(calls) == 2
    with torch.no_grad():
        params[0].add_(1.0)  # an optimiser step (in-place update) invalidates the caches
        model(x)
    assert len(calls) == 3


def test_new_step_resets_generated_grads():
    model, hyper, _ = build("svd", "residual")
    opt = train_steps(model, hyper, steps=1)
    x = torch.randn(4, 8)
    model(x).pow(2).sum().backward()
    first = hyper.generated_grads[0]["lora_lambda"].clone()
    opt.step()
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    second = hyper.generated_grads[0]["lora_lambda"]
    assert not torch.allclose(second, 2 * first)  # not accumulated across the step
    assert not torch.allclose(second, first)


@pytest.mark.parametrize("kind", ["svd", "lora"])
@pytest.mark.parametrize("mode", ["residual", "recurrent"])
def test_materialize_equals_generated(kind, mode):
    model, hyper, _ = build(kind, mode)
    train_steps(model, hyper, steps=3)
    if kind == "svd":
        model.layer[1].up.rank_mask[1] = 0.0
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
        deltas = {n: l.delta_weight().clone() for n, l in adapter_layers(model).items()}
    hyper.materialize(model)
    layers = adapter_layers(model)
    plain_type = SVDLinear if kind == "svd" else LoRALinear
    assert all(type(layer) is plain_type for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        for n, layer in layers.items():
            torch.testing.assert_close(layer.delta_weight(), deltas[n])
    if kind == "svd":
        assert model.layer[1].up.kept_rank == 3
        assert model.layer[1].up.lora_factors()[0].shape[0] == 3
    # merging the materialised model reproduces the logits
    for layer in layers.values():
        layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_mask_multiplies_generated_lambda():
    model, hyper, _ = build("svd", "seeded")
    train_steps(model, hyper, steps=2)
    layer = model.layer[0].down
    layer.rank_mask[2] = 0.0
    p, lam, q = layer.factors()
    raw = layer.generated()["lora_lambda"]
    assert raw[2] != 0 and lam[2] == 0
    torch.testing.assert_close(lam[:2], raw[:2])


def test_bad_mode_and_no_layers():
    torch.manual_seed(0)
    model = Toy()
    inject_adapters(model, ["query"], lambda n, l: SVDLinear(l, rank=2, alpha=2.0))
    with pytest.raises(ValueError, match="HyperSVDLinear"):
        AdapterHypernet(adapter_layers(model))
    model, _, _ = build("svd", "residual")
    with pytest.raises(ValueError, match="Unknown hypernet mode"):
        AdapterHypernet(adapter_layers(Toy()), mode="other")


# ---------------------------------------------------------------------------------------------- issue 13 options
OPTIONS = [dict(tokens="triplet"), dict(scaling="gains"), dict(scaling="grad_rms"),
           dict(tokens="triplet", scaling="grad_rms")]


@pytest.mark.parametrize("kind", ["svd", "lora"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_options_keep_step_zero_equal_to_plain_adapter(kind, options):
    model, hyper, before = build(kind, **options)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), plain_equivalent(before, kind)(x), rtol=1e-6, atol=1e-6)
    opt = train_steps(model, hyper, steps=2)  # and they train: the generated factors leave the base ones
    assert opt is not None and any(not torch.equal(layer.generated()["lora_P" if kind == "svd" else "lora_A"],
                                                   layer.lora_P if kind == "svd" else layer.lora_A)
                                   for layer in adapter_layers(model).values())


def test_triplet_token_is_the_unbiased_projection_of_the_whole_triplet():
    model, hyper, _ = build("svd", tokens="triplet")
    generator = hyper.generators["lora_lambda"]
    assert isinstance(generator, TripletGenerator)
    assert sorted(generator.in_proj) == ["16x1x8", "8x1x16", "8x1x8"]  # (d_out, 1, d_in) of query, up, down
    with torch.no_grad():
        for emb in (generator.rank_embedding, generator.layer_embedding.weight, generator.type_embedding.weight):
            emb.zero_()
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.lora_lambda.data.zero_()  # AdaLoRA's init: the factor-token Λ generator sees r equal tokens here
    groups = hyper.encoder_inputs()["lora_lambda"]
    up = layers["layer.0.up"]
    members, x, _ = next(g for g in groups if 1 in g[0])
    weight = generator.in_proj["16x1x8"].weight
    for i in range(4):
        token = torch.cat([up.lora_P[:, i], up.lora_lambda[i:i + 1], up.lora_Q[i]])
        torch.testing.assert_close(x[members.index(1), i], weight @ token)
    assert not torch.allclose(x[members.index(1), 0], x[members.index(1), 1])


def test_gains_are_one_learnable_scalar_per_matrix_and_factor():
    model, hyper, _ = build("svd", scaling="gains")
    assert {k: tuple(v.shape) for k, v in hyper.gains.items()} == {f: (6,) for f in ("lora_P", "lora_lambda", "lora_Q")}
    assert all(torch.equal(g, torch.ones(6)) for g in hyper.gains.values())
    train_steps(model, hyper, steps=3)
    assert not torch.equal(hyper.gains["lora_P"], torch.ones(6))
    with torch.no_grad():  # a zero gain switches that matrix's generated increment off
        hyper.gains["lora_P"][2] = 0.0
    layer = adapter_layers(model)["layer.0.down"]
    torch.testing.assert_close(layer.generated()["lora_P"], layer.lora_P, rtol=0, atol=0)


def test_grad_rms_divides_each_matrix_gradient_by_its_rms():
    x = torch.zeros(2, 2, 2, requires_grad=True)
    grad = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, -1.0]]])
    _NormalizeGradPerMatrix.apply(x).backward(grad)
    # matrix 0: RMS = sqrt(25 / 4) = 2.5; matrix 1: RMS = 1
    torch.testing.assert_close(x.grad, torch.tensor([[[1.2, 1.6], [0.0, 0.0]], [[1.0, 1.0], [1.0, -1.0]]]))


def test_grad_rms_generator_step_ignores_loss_scale_importance_does_not():
    """Generator gradients are per-matrix normalised (a loss × 10 leaves them unchanged), while the generated
    tensors (importance) get the true gradient."""
    grads = {}
    for scale in (1.0, 10.0):
        model, hyper, _ = build("svd", scaling="grad_rms")
        train_steps(model, hyper, steps=1)  # non-zero output projections
        for p in list(model.parameters()) + list(hyper.parameters()):
            p.grad = None
        (scale * model(torch.randn(5, 8, generator=torch.Generator().manual_seed(3))).pow(2).mean()).backward()
        grads[scale] = ([p.grad.clone() for p in hyper.generators.parameters() if p.grad is not None],
                        hyper.generated_grads[1]["lora_P"].clone())
    for g1, g10 in zip(grads[1.0][0], grads[10.0][0]):
        torch.testing.assert_close(g10, g1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[10.0][1], 10 * grads[1.0][1], rtol=1e-4, atol=1e-7)


def test_bad_tokens_and_scaling():
    with pytest.raises(ValueError, match="Unknown hypernet tokens 'pairs'"):
        build(tokens="pairs")
    with pytest.raises(ValueError, match="Unknown hypernet scaling 'rms'"):
        build(scaling="rms")
