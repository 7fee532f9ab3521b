"""A 2-"node" fit: two ``lora-lightning fit`` processes on localhost, each with the Slurm environment of a different
node (``--nodes=2 --ntasks-per-node=1``), rendezvous through MASTER_PORT and train with DDP over gloo."""
from __future__ import annotations

import pytest
import torch

from tests.cluster.launcher import assert_same, finish, free_port, launch, slurm_env, write_config

pytestmark = pytest.mark.integration


def test_two_nodes_train_to_identical_adapters(tiny_bert, tmp_path):
    config = write_config(tmp_path / "job", tiny_bert, "AdaLoRAModule", max_steps=4, callbacks=[
        {"class_path": "cluster_callbacks.DumpState", "init_args": {"path": str(tmp_path / "job" / "rank{rank}.pt")}}])
    port = free_port()
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    processes = [launch(config, env=slurm_env(node, nodes=2, port=port), log=logs[node]) for node in (0, 1)]
    results = [finish(p, log) for p, log in zip(processes, logs)]
    for code, output in results:
        assert code == 0, output[-3000:]
    rank0, rank1 = torch.load(tmp_path / "job" / "rank0.pt"), torch.load(tmp_path / "job" / "rank1.pt")
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert_same(rank0["adapter"], rank1["adapter"], "adapter")
    assert_same(rank0["masks"], rank1["masks"], "masks")
    assert_same(rank0["callbacks"]["RankPruningScheduler"], rank1["callbacks"]["RankPruningScheduler"], "pruning")
    assert "world_size=2" in results[0][1] or "distributed_backend=gloo" in results[0][1]
