"""adapters.base.low_rank_output: fp32 factors on a narrower (bf16) input keep the input narrow for the backward,
with the plain path's output and gradients (first and second order)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_lightning.adapters.base import low_rank_output


def inputs(dtype=torch.bfloat16):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16).to(dtype).requires_grad_()
    first = torch.randn(4, 16, requires_grad=True)
    second = torch.randn(8, 4, requires_grad=True)
    return x, first, second


def plain(x, first, second):
    return F.linear(F.linear(x.to(first.dtype), first), second)


def test_output_and_gradients_equal_the_plain_upcast():
    x, first, second = inputs()
    upstream = torch.randn(2, 5, 8)
    ours = torch.autograd.grad((low_rank_output(x, first, second) * upstream).sum(), (x, first, second))
    reference = torch.autograd.grad((plain(x, first, second) * upstream).sum(), (x, first, second))
    torch.testing.assert_close(low_rank_output(x, first, second), plain(x, first, second), rtol=0, atol=0)
    for got, expected in zip(ours, reference):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_saves_the_narrow_input_not_an_fp32_copy():
    x, first, second = inputs()
    for fn, expected_dtypes in ((low_rank_output, {torch.bfloat16}), (plain, {torch.float32})):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(x, first, second)
        input_sized = {t.dtype for t in saved if t.numel() == x.numel()}
        assert input_sized == expected_dtypes, fn.__name__


def test_second_order_gradients_equal_the_plain_path():  # Sensitivity-LoRA's Hessian probes differentiate twice
    x, first, second = inputs()
    results = []
    for fn in (low_rank_output, plain):
        (g,) = torch.autograd.grad(fn(x, first, second).square().sum(), first, create_graph=True)
        results.append(torch.autograd.grad(g.sum(), (first, second)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_same_dtype_and_autocast_take_the_plain_path():
    x, first, second = inputs(torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        low_rank_output(x, first, second)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # fp32 input: saved as it is, no copy either way
    x, first, second = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = low_rank_output(x, first, second)
    out.float().sum().backward()  # autocast's narrow copies: the backward runs without dtype mismatches
    assert out.dtype == torch.bfloat16 and first.grad.dtype == torch.float32 and torch.isfinite(first.grad).all()
