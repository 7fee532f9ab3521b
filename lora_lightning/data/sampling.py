"""The training order: a shuffle that a resumed run reproduces, and continues in the middle of an epoch.

:func:`training_loader` builds a torchdata ``StatefulDataLoader`` (Lightning stores its ``state_dict`` in every
checkpoint, ``loops.fit_loop.state_dict.combined_loader``, and hands it back on resume) over a
:class:`ResumableSampler`, whose state is the epoch and the samples the fit consumed in it.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class ResumableSampler(DistributedSampler):
    """A random permutation per epoch drawn from ``seed + epoch`` (this process's shard of it under DDP).

    Lightning calls ``set_epoch`` before every epoch (also after a resume), so an interrupted and resumed fit sees
    the order of an uninterrupted one. Being a ``DistributedSampler``, Lightning uses it under DDP as it is.

    State (``state_dict``): the ``epoch`` and the samples ``yielded`` in it; torchdata's ``StatefulDataLoader``
    saves and restores it and then skips nothing itself. On :meth:`load_state_dict`, ``processed_batches`` (when
    given and not ``None``) replaces the saved count by the batches the fit loop actually trained on: a checkpoint
    written between fetching a batch and training on it (the SIGUSR1 handler) would otherwise skip that batch.
    The next iteration (only that one) starts after the skipped samples, at the index level (no data is loaded for
    them), and only if the sampler is still at the saved epoch; a whole consumed epoch resumes at the next one.

    ``__iter__`` is a generator: the epoch is read at the first ``next``, after Lightning's ``set_epoch``
    (``FitLoop.setup_data`` creates the iterator before it sets the epoch).
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        processed_batches: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.processed_batches = batch_size, processed_batches
        self.yielded = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples to skip), set by load_state_dict

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume_at is not None:
            (epoch, skip), self._resume_at = self._resume_at, None
            if epoch != self.epoch:  # the trainer moved to another epoch: start it at its first sample
                skip = 0
        self.yielded = skip
        for index in itertools.islice(super().__iter__(), skip, None):
            self.yielded += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        processed = self.processed_batches() if self.processed_batches is not None else None
        if processed is not None:
            yielded = min(yielded, processed * self.batch_size)
        if yielded >= len(self):  # the epoch was finished: the next one starts afresh
            epoch, yielded = epoch + 1, 0
        self.set_epoch(epoch)  # Lightning sets the same epoch again before the epoch runs
        self._resume_at = (epoch, yielded) if yielded else None


def training_loader(
    datamodule: Any, dataset: Sized, batch_size: int, seed: int,
    processed_batches: Callable[[], int | None] | None = None, **loader_kwargs: Any,
) -> StatefulDataLoader:
    """The resumable training DataLoader of ``datamodule`` (its trainer, if attached, says the DDP rank and size)."""
    trainer = getattr(datamodule, "trainer", None)
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, seed=seed, batch_size=batch_size, num_replicas=max(1, world), rank=rank,
                               processed_batches=processed_batches)
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_kwargs)
