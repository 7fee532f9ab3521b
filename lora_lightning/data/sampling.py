"""Shuffling that a resumed run reproduces: the order of epoch e depends only on (seed, e)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


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


class _SkipFirstBatches:
    """Yields an index sampler's batches from batch ``skip`` on, once: skipping costs index lists, not data."""

    def __init__(self, index_sampler, skip: int) -> None:
        self.index_sampler, self.skip = index_sampler, skip

    def __iter__(self) -> Iterator:
        # a generator, so the skip is used up by the first iteration that is actually advanced: DataLoader iterators
        # call ``iter()`` on this more than once when they start, and a persistent-workers iterator reuses this
        # object for the following epochs, which must be whole
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.index_sampler), skip, None)

    def __len__(self) -> int:
        return max(len(self.index_sampler) - self.skip, 0)


class ResumableDataLoader(DataLoader):
    """A training DataLoader that can say how far into an epoch the fit got, and start there again.

    Lightning stores :meth:`state_dict` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and, on
    resume, hands it to :meth:`load_state_dict` before it first iterates the loader; a loader with this interface is
    "resumable" and Lightning then continues the epoch after the last consumed batch instead of at its first one.
    The state is the sampler's ``epoch`` and the batches of it the training loop has ``consumed``. ``consumed``
    comes from ``position`` when given (the DataModule reads the trainer's batch progress, which is right even when
    the checkpoint is written between fetching a batch and training on it, as the SIGUSR1 handler may do);
    otherwise it is the number of batches this loader has yielded in the epoch.

    After :meth:`load_state_dict`, the next iteration (only that one) skips ``consumed`` batches at the index level
    (a wrapper around the batch sampler: no data is loaded or collated for them; under DDP each rank skips batches
    of its own shard). The skip only applies if the sampler is at the saved epoch when the iteration starts; a
    checkpoint taken with the whole epoch consumed moves the sampler to the next epoch and skips nothing.

    ``position`` is an ``__init__`` argument so that Lightning's re-instantiation of the loader (``_update_dataloader``
    puts a ``DistributedSampler`` in under DDP) keeps it.
    """

    def __init__(self, *args, position: Callable[[], int | None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self._yielded = 0
        self._resume_at: tuple[int | None, int] | None = None  # (epoch, batches to skip), set by load_state_dict
        self._skip_now = 0  # read by ``_index_sampler`` while the next iterator is being built

    def _sampler_epoch(self) -> int | None:
        epoch = getattr(self.sampler, "epoch", None)
        return None if epoch is None else int(epoch)

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        return _SkipFirstBatches(sampler, self._skip_now) if self._skip_now else sampler

    def _get_iterator(self):
        try:
            return super()._get_iterator()
        finally:
            self._skip_now = 0

    def __iter__(self):
        # a generator: this runs at the first ``next``, after Lightning's ``set_epoch`` (``FitLoop.setup_data``
        # calls ``iter()`` before it sets the epoch), so neither the skip nor worker prefetching sees a stale epoch
        skip = 0
        if self._resume_at is not None:
            (epoch, skip), self._resume_at = self._resume_at, None
            if epoch is not None and self._sampler_epoch() != epoch:  # another epoch: start it at its first batch
                skip = 0
        if skip and self._iterator is not None:  # a persistent-workers iterator would ignore the skip
            self._iterator = None
        self._skip_now, self._yielded = skip, skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int | None]:
        consumed = self.position() if self.position is not None else None
        return {"epoch": self._sampler_epoch(), "consumed": self._yielded if consumed is None else int(consumed)}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        epoch, consumed = state.get("epoch"), int(state.get("consumed") or 0)
        if epoch is not None and consumed >= len(self):  # the epoch was finished: the next one starts afresh
            epoch, consumed = epoch + 1, 0
        if epoch is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)  # Lightning sets the same epoch again before the epoch runs
        self._resume_at = (epoch, consumed) if consumed else None
