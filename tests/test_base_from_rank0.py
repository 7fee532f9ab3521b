"""``base_from_rank0``: which process reads the base, the empty (meta-device) build of the others, and the refusals.
The 2-process fits that fill the empty processes from rank 0 are in tests/integration/test_fsdp2.py."""
from __future__ import annotations

import pytest
import torch

from lora_lightning.modules import HyperAdaLoRAModule, LoRAModule, SensitivityLoRAModule
from lora_lightning.sharding import ShardingError, has_meta_tensors, launch_rank
from tests.helpers import batch_loader, quiet_trainer

LAUNCH_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


@pytest.mark.parametrize("environment, rank", [
    ({}, 0),
    ({"RANK": "3", "LOCAL_RANK": "1"}, 3),                 # torchrun: RANK is the global rank
    ({"RANK": "0", "SLURM_PROCID": "1"}, 0),               # torchrun inside an srun task
    ({"SLURM_PROCID": "2"}, 2),                            # srun
    ({"LOCAL_RANK": "1"}, 1),                              # Lightning's launcher, first node
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1),            # Lightning's launcher, another node
    ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, 0),
])
def test_launch_rank_reads_the_launchers_variables(monkeypatch, environment, rank):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert launch_rank() == rank


def build(monkeypatch, cls, backbone, local_rank: str | None, **options):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    torch.manual_seed(0)
    return cls(backbone=backbone, task="causal-lm", target_modules=["q_proj", "v_proj"], **options)


@pytest.mark.parametrize("cls, options", [
    (LoRAModule, {"rank": 2}),
    (HyperAdaLoRAModule, {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "hypernet_hidden": 16,
                          "hypernet_heads": 2}),
])
def test_other_processes_build_everything_they_would_receive_empty_and_rank0_reads_the_base(
        monkeypatch, tiny_llama, cls, options):
    plain = build(monkeypatch, cls, tiny_llama, None, **options)
    empty = build(monkeypatch, cls, tiny_llama, "1", base_from_rank0=True, **options)
    rank0 = build(monkeypatch, cls, tiny_llama, "0", base_from_rank0=True, **options)
    assert all(t.is_meta for t in [*empty.backbone.parameters(), *empty.backbone.buffers()])
    assert not has_meta_tensors(rank0) and not has_meta_tensors(plain)
    if cls is HyperAdaLoRAModule:  # built from the base factors: empty too, filled from rank 0 as well
        assert all(t.is_meta for t in empty.hypernet.parameters())
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    base = {k: v for k, v in plain.state_dict().items() if "lora_" not in k and "hypernet" not in k}
    for key, value in base.items():
        torch.testing.assert_close(rank0.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_without_model_parallel_strategy_it_is_refused_before_the_first_step(monkeypatch, tiny_bert):
    for variable in LAUNCH_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    module = LoRAModule(backbone=tiny_bert, rank=2, target_modules=["query"], base_from_rank0=True)
    with pytest.raises(ShardingError, match="base_from_rank0 needs Lightning's ModelParallelStrategy"):
        quiet_trainer(max_steps=1).fit(module, batch_loader(2))
    assert all(p.grad is None for p in module.parameters())


def test_quantised_base_and_sensitivity_lora_are_refused_before_loading():
    with pytest.raises(ValueError, match="quantised base .* set base_from_rank0: false"):
        LoRAModule(backbone="/does/not/exist", quantization="nf4", base_from_rank0=True)
    with pytest.raises(ValueError, match="Sensitivity-LoRA calibrates on every process's whole model"):
        SensitivityLoRAModule(backbone="/does/not/exist", base_from_rank0=True)
