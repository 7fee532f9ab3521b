"""ResumableDataLoader: its state is the batches consumed in the epoch, and a loaded state skips exactly those."""
from __future__ import annotations

import torch
from lightning.fabric.utilities.types import _Stateful
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from lora_lightning.data.sampling import EpochSeededSampler, ResumableDataLoader

DATA = list(range(22))  # 6 batches of 4, the last one short


def loader(epoch: int = 0, **kwargs) -> ResumableDataLoader:
    sampler = EpochSeededSampler(len(DATA), seed=3)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(DATA, batch_size=4, sampler=sampler, **kwargs)


def batches(iterable) -> list[list[int]]:
    return [b.tolist() for b in iterable]


def test_is_stateful_for_lightning():
    assert isinstance(loader(), _Stateful)


def test_round_trip_skips_exactly_the_consumed_batches():
    reference = batches(loader(epoch=2))
    interrupted = loader(epoch=2)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "consumed": 2}

    resumed = loader(epoch=0)  # a fresh process: the sampler starts at epoch 0
    resumed.load_state_dict(state)
    assert resumed.sampler.epoch == 2
    rest = batches(resumed)
    assert seen + rest == reference
    assert resumed.state_dict() == {"epoch": 2, "consumed": len(reference)}
    assert batches(resumed) == reference, "only the first iteration after a load skips"


def test_position_callable_is_the_reported_state():
    consumed = {"n": 3}
    stateful = loader(position=lambda: consumed["n"])
    it = iter(stateful)
    for _ in range(4):  # the loop fetched one batch more than it consumed
        next(it)
    assert stateful.state_dict()["consumed"] == 3
    consumed["n"] = None  # no trainer: fall back to the batches yielded
    assert stateful.state_dict()["consumed"] == 4


def test_skip_only_applies_to_the_saved_epoch():
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "consumed": 2})
    resumed.sampler.set_epoch(2)  # the trainer moved on (e.g. the checkpoint was from an earlier epoch's end)
    assert batches(resumed) == batches(loader(epoch=2))


def test_a_finished_epoch_resumes_at_the_next_one():
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "consumed": 6})
    assert resumed.sampler.epoch == 2
    assert batches(resumed) == batches(loader(epoch=2))


def test_skipping_respects_ddp_shards_and_survives_lightning_reinstantiation():
    marker = lambda: 1  # noqa: E731
    with _replace_dunder_methods(DataLoader, "dataset"):  # what Lightning does around train_dataloader()
        original = ResumableDataLoader(DATA, batch_size=2, shuffle=True, position=marker)
    for rank in range(2):
        sampler = DistributedSampler(DATA, num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(1)
        reference = batches(DataLoader(DATA, batch_size=2, sampler=sampler))
        ddp = _update_dataloader(original, DistributedSampler(DATA, num_replicas=2, rank=rank, shuffle=True, seed=5))
        assert isinstance(ddp, ResumableDataLoader) and ddp.position is marker
        assert isinstance(ddp.sampler, DistributedSampler)
        ddp.load_state_dict({"epoch": 1, "consumed": 2})
        assert batches(ddp) == reference[2:]


def test_worker_processes_start_at_the_resumed_batch():
    reference = batches(loader(epoch=1))
    resumed = loader(num_workers=1, persistent_workers=True)
    resumed.load_state_dict({"epoch": 1, "consumed": 4})
    assert batches(resumed) == reference[4:]
    assert batches(resumed) == reference, "the persistent workers' next epoch is whole again"


def test_resumed_batches_are_the_same_tensors():
    stateful = loader(epoch=1)
    stateful.load_state_dict({"epoch": 1, "consumed": 5})
    (last,) = list(stateful)
    assert torch.equal(last, torch.tensor(batches(loader(epoch=1))[5]))
