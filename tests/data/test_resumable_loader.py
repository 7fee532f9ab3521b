"""The training loader (torchdata StatefulDataLoader over ResumableSampler): its state is the epoch and the samples
consumed in it, and a loaded state skips exactly those."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DataLoader, DistributedSampler

from lora_lightning.data.sampling import ResumableSampler, training_loader

DATA = list(range(22))  # 6 batches of 4, the last one short


def loader(epoch: int = 0, processed=None, **kwargs):
    stateful = training_loader(None, DATA, batch_size=4, seed=3, processed_batches=processed, **kwargs)
    stateful.sampler.set_epoch(epoch)
    return stateful


def batches(iterable) -> list[list[int]]:
    return [b.tolist() for b in iterable]


def sampler_state(loader_state: dict) -> dict:
    """The ResumableSampler's own state inside a StatefulDataLoader state (wherever torchdata nests it)."""
    if {"epoch", "yielded"} <= loader_state.keys():
        return loader_state
    for value in loader_state.values():
        if isinstance(value, dict) and (found := sampler_state(value)) is not None:
            return found
    return None


def test_is_stateful_for_lightning_and_orders_like_a_seeded_permutation():
    assert isinstance(loader(), _Stateful)
    order = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(3 + 2)).tolist()
    assert sum(batches(loader(epoch=2)), []) == order


def test_round_trip_skips_exactly_the_consumed_batches():
    reference = batches(loader(epoch=2))
    interrupted = loader(epoch=2)
    iterator = iter(interrupted)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert sampler_state(state) == {"epoch": 2, "yielded": 8}

    resumed = loader(epoch=0)  # a fresh process: the sampler starts at epoch 0
    resumed.load_state_dict(state)
    rest = batches(resumed)
    assert resumed.sampler.epoch == 2
    assert seen + rest == reference
    assert batches(resumed) == reference, "only the first iteration after a load skips"


def test_processed_batches_replace_the_fetched_ones_on_load():
    interrupted = loader(epoch=1)
    iterator = iter(interrupted)
    for _ in range(4):  # the loop fetched one batch more than it trained on
        next(iterator)
    state = interrupted.state_dict()
    assert sampler_state(state)["yielded"] == 16
    resumed = loader(processed=lambda: 3)
    resumed.load_state_dict(state)
    assert batches(resumed) == batches(loader(epoch=1))[3:]
    without_trainer = loader(processed=lambda: None)
    without_trainer.load_state_dict(state)
    assert batches(without_trainer) == batches(loader(epoch=1))[4:]


def test_skip_only_applies_to_the_saved_epoch():
    resumed = loader()
    resumed.load_state_dict(loader_state(epoch=1, consumed_batches=2))
    iterator = iter(resumed)  # Lightning's order: load, iter (the sampler state is applied), set_epoch, next
    resumed.sampler.set_epoch(2)  # the trainer moved on (e.g. the checkpoint was from an earlier epoch's end)
    assert batches(iterator) == batches(loader(epoch=2))


def test_a_finished_epoch_resumes_at_the_next_one():
    resumed = loader()
    resumed.load_state_dict(loader_state(epoch=1, consumed_batches=6))
    iterator = iter(resumed)
    assert resumed.sampler.epoch == 2
    assert batches(iterator) == batches(loader(epoch=2))


def loader_state(epoch: int, consumed_batches: int, **kwargs) -> dict:
    """The state a loader saves after ``consumed_batches`` batches of ``epoch``."""
    interrupted = loader(epoch=epoch, **kwargs)
    iterator = iter(interrupted)
    for _ in range(consumed_batches):
        next(iterator)
    return interrupted.state_dict()


def test_ddp_shards_are_the_distributed_samplers_and_resume_within_the_shard():
    for rank in range(2):
        trainer = SimpleNamespace(world_size=2, global_rank=rank)
        sharded = training_loader(SimpleNamespace(trainer=trainer), DATA, batch_size=2, seed=5)
        assert isinstance(sharded.sampler, DistributedSampler)  # Lightning keeps it instead of wrapping it
        reference_sampler = DistributedSampler(DATA, num_replicas=2, rank=rank, shuffle=True, seed=5)
        reference_sampler.set_epoch(1)
        reference = batches(DataLoader(DATA, batch_size=2, sampler=reference_sampler))
        sharded.sampler.set_epoch(1)
        iterator = iter(sharded)
        next(iterator), next(iterator)
        state = sharded.state_dict()
        resumed = training_loader(SimpleNamespace(trainer=trainer), DATA, batch_size=2, seed=5)
        resumed.load_state_dict(state)
        assert batches(resumed) == reference[2:]


def test_worker_processes_start_at_the_resumed_batch():
    reference = batches(loader(epoch=1))
    workers = dict(num_workers=1, persistent_workers=True)
    resumed = loader(**workers)
    resumed.load_state_dict(loader_state(epoch=1, consumed_batches=4, **workers))
    assert batches(resumed) == reference[4:]
    assert batches(resumed) == reference, "the persistent workers' next epoch is whole again"


def test_sampler_alone_yields_each_index_once_per_epoch():
    sampler = ResumableSampler(DATA, seed=0, batch_size=4)
    sampler.set_epoch(4)
    assert sorted(sampler) == DATA and sampler.yielded == len(DATA)
