import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning.adapters.base import adapter_layers, disable_adapters, inject_adapters, unload_adapters
from lora_lightning.adapters.lora import LoRALinear
from lora_lightning.adapters.svd import SVDLinear


def trained_lora(base: nn.Module, rank: int = 3, alpha: float = 6.0) -> LoRALinear:
    torch.manual_seed(1)
    layer = LoRALinear(base, rank=rank, alpha=alpha)
    nn.init.normal_(layer.lora_B)
    return layer


def test_lora_equals_base_at_init():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 7)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 2.0


def test_lora_output_equals_dense_update():
    base = nn.Linear(7, 5)
    layer = trained_lora(base)
    x = torch.randn(2, 4, 7)
    dense = base.weight + (6.0 / 3) * layer.lora_B @ layer.lora_A
    expected = x @ dense.T + base.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), dense - base.weight)


@pytest.mark.parametrize("base", [nn.Linear(6, 4), Conv1D(4, 6)], ids=["linear", "conv1d"])
def test_merge_unmerge_round_trip(base):
    original = base.weight.detach().clone()
    layer = trained_lora(base)
    x = torch.randn(3, 6)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged)
    torch.testing.assert_close(base(x), unmerged)  # the update now lives in the base weight
    layer.unmerge()
    torch.testing.assert_close(base.weight, original)
    torch.testing.assert_close(layer(x), unmerged)


def test_disable_adapters_runs_backbone_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    reference = [m.weight.detach().clone() for m in (model[0], model[2])]
    x = torch.randn(5, 4)
    base_out = model(x)
    inject_adapters(model, ["0", "2"], lambda name, layer: trained_lora(layer, rank=2, alpha=2))
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    with disable_adapters(model):
        torch.testing.assert_close(model(x), base_out)
    torch.testing.assert_close(model(x), adapted)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(adapter_layers(model).values(), reference))


def test_unload_merges_and_restores_plain_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    inject_adapters(model, ["0", "1"], lambda name, layer: trained_lora(layer, rank=2, alpha=2))
    x = torch.randn(3, 4)
    adapted = model(x)
    unload_adapters(model)
    assert all(type(m) is nn.Linear for m in model)
    torch.testing.assert_close(model(x), adapted)


def test_lora_factors_reproduce_delta():
    layer = trained_lora(nn.Linear(5, 3))
    a, b, scaling = layer.lora_factors()
    torch.testing.assert_close(scaling * b @ a, layer.delta_weight())


def test_reset_rank_rebuilds_factors_and_rejects_zero():
    layer = LoRALinear(nn.Linear(5, 3), rank=2, alpha=4)
    layer.reset_rank(6)
    assert layer.lora_A.shape == (6, 5) and layer.lora_B.shape == (3, 6)
    assert layer.scaling == pytest.approx(4 / 6)
    assert torch.count_nonzero(layer.lora_B) == 0
    with pytest.raises(ValueError, match="rank must be >= 1"):
        layer.reset_rank(0)


@pytest.mark.parametrize("adapter", [LoRALinear, SVDLinear])
def test_alpha_zero_is_a_clear_error(adapter):
    with pytest.raises(ValueError, match=r"alpha must be > 0 .*0 makes it do nothing"):
        adapter(nn.Linear(4, 4), rank=2, alpha=0)
