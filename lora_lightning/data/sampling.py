"""Shuffling that a resumed run reproduces: the order of epoch e depends only on (seed, e)."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` before every epoch (also after a resume), so an interrupted and resumed fit
    sees the same batches as an uninterrupted one; a generator carried across epochs would restart instead.
    Under DDP, Lightning wraps this in a distributed sampler that shards its order.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def training_order(datamodule, num_samples: int, seed: int) -> dict:
    """DataLoader arguments for the training order.

    One process: :class:`EpochSeededSampler`. Several (DDP): plain ``shuffle=True``, which Lightning replaces by a
    ``DistributedSampler`` that shards the data and is itself reseeded by ``set_epoch``; a custom sampler would be
    wrapped instead, and the wrapper never forwards ``set_epoch``, so every epoch would repeat one order.
    """
    trainer = getattr(datamodule, "trainer", None)
    if trainer is not None and trainer.world_size > 1:
        return {"shuffle": True}
    return {"sampler": EpochSeededSampler(num_samples, seed)}
