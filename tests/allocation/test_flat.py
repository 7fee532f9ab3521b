"""flatten/unflatten: one vector for one collective, split back into the same shapes."""
from __future__ import annotations

import pytest
import torch

from lora_lightning.allocation.flat import flatten, unflatten


def test_round_trip_keeps_order_shapes_and_values():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.tensor([[8.0], [9.0]])]
    flat = flatten(tensors)
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 8.0, 9.0]
    back = unflatten(flat * 2, tensors)
    assert [t.shape for t in back] == [(2, 3), (1,), (2, 1)]
    assert all(torch.equal(b, t * 2) for b, t in zip(back, tensors))


def test_mixed_dtypes_are_promoted():
    flat = flatten([torch.tensor([1.5], dtype=torch.float64), torch.tensor([2.0])])
    assert flat.dtype == torch.float64 and flat.tolist() == [1.5, 2.0]


def test_wrong_length_is_a_clear_error():
    with pytest.raises(ValueError, match="into 2 tensors of 5 elements"):
        unflatten(torch.zeros(4), [torch.zeros(2), torch.zeros(3)])
