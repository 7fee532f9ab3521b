"""Gradient clipping over FSDP2-sharded (DTensor) and replicated (plain) gradients together, in a 1-process gloo group:
the result must equal torch's clipping of the same gradients as plain tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning.sharding import clip_sharded_gradients_
from tests.helpers import one_process_group


@pytest.fixture
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    with one_process_group():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        yield init_device_mesh("cpu", (1,))


def parameters(mesh=None) -> list[nn.Parameter]:
    """Two parameters with fixed gradients (whole norm 13); with ``mesh``, the first one's gradient is a DTensor."""
    from torch.distributed.tensor import Shard, distribute_tensor

    first, second = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))
    first.grad, second.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([0.0, 12.0, 0.0])
    if mesh is not None:
        first.grad = distribute_tensor(first.grad, mesh, [Shard(0)])
    return [first, second]


def whole(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


@pytest.mark.parametrize("clip_val", [1.0, 100.0])
def test_norm_clipping_of_mixed_gradients_equals_torch_on_whole_tensors(mesh, clip_val):
    reference, mixed = parameters(), parameters(mesh)
    torch.nn.utils.clip_grad_norm_(reference, clip_val)
    clip_sharded_gradients_(mixed, clip_val)
    for ref, param in zip(reference, mixed):
        torch.testing.assert_close(whole(param.grad), ref.grad, atol=1e-6, rtol=0)
    expected_norm = min(13.0, clip_val)  # scaled down to clip_val, or left as it is
    norm = torch.linalg.vector_norm(torch.cat([whole(p.grad).flatten() for p in mixed]))
    assert norm.item() == pytest.approx(expected_norm, rel=1e-5)


def test_value_clipping_of_mixed_gradients_clamps_every_element(mesh):
    reference, mixed = parameters(), parameters(mesh)
    torch.nn.utils.clip_grad_value_(reference, 3.5)
    clip_sharded_gradients_(mixed, 3.5, "value")
    for ref, param in zip(reference, mixed):
        torch.testing.assert_close(whole(param.grad), ref.grad)
    assert whole(mixed[1].grad).max().item() == 3.5
