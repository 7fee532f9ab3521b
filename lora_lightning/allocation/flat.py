"""Many tensors as one flat vector and back, so that a distributed caller moves them in a single collective (the
sensitivity statistics' all-reduce, the rank masks' broadcast) and the budget ranks all triplets together."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """The tensors flattened and concatenated in order (one device; mixed dtypes are promoted as ``torch.cat`` does)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The inverse of :func:`flatten`: ``flat`` split into tensors shaped as those of ``like`` (views of ``flat``)."""
    sizes = [t.numel() for t in like]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(
            f"Cannot split a tensor of shape {tuple(flat.shape)} into {len(sizes)} tensors of {sum(sizes)} elements "
            "in all: give the flat vector that flatten() made from tensors shaped like these."
        )
    return [part.view(t.shape) for part, t in zip(flat.split(sizes), like)]
