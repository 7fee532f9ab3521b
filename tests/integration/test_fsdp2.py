"""Sharded training with Lightning's ModelParallelStrategy (FSDP2 ``fully_shard`` per transformer block), 2 processes
over gloo through the real console script, compared with DDP runs of the same config: adapter weights, checkpoint
content (adapter and head only, full tensors), exact resume and the PEFT export."""
from __future__ import annotations

import pytest
import torch
import yaml

from lora_lightning.export import export_checkpoint, read_peft_export
from lora_lightning.modules import LoRAModule
from lora_lightning.sharding import ShardingError, transformer_blocks
from tests.cluster.launcher import assert_same, finish, launch, write_config
from tests.helpers import batch_loader, one_process_group, quiet_trainer

pytestmark = pytest.mark.integration

FSDP2 = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
         "--trainer.strategy.save_distributed_checkpoint", "false"]
DDP = ["--trainer.strategy", "ddp"]
TARGETS = {"tiny_bert": ["query", "value"], "tiny_llama": ["q_proj", "v_proj"]}


def config(folder, backbone: str, targets: list[str], stop_at: int | None = None, method: str = "LoRAModule"):
    """A 6-step fit of ``method`` with a checkpoint every 4 steps, dumping the final adapter per rank; with ``stop_at``, the
    first launch stops after that step (the next one resumes)."""
    callbacks = [{"class_path": "cluster_callbacks.DumpState", "init_args": {"path": str(folder / "final{rank}.pt")}}]
    if stop_at is not None:
        callbacks.append({"class_path": "cluster_callbacks.StopAtStep",
                          "init_args": {"step": stop_at, "marker": str(folder / "stopped{rank}")}})
    path = write_config(folder, backbone, method, max_steps=6, checkpoint_every=4, callbacks=callbacks)
    content = yaml.safe_load(path.read_text())
    content["model"]["init_args"]["target_modules"] = targets
    path.write_text(yaml.safe_dump(content))
    return path


def fit(path, strategy: list[str], *extra: str) -> None:
    log = path.parent / "launch.log"
    code, output = finish(launch(path, extra=["--trainer.devices", "2", *strategy, *extra], log=log), log)
    assert code == 0, output[-3000:]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_llama"])
def test_lora_sharded_equals_ddp_saves_adapters_only_resumes_and_exports(backbone, request, tmp_path):
    folder = request.getfixturevalue(backbone)
    fit(config(tmp_path / "ddp", folder, TARGETS[backbone]), DDP)
    sharded = config(tmp_path / "fsdp", folder, TARGETS[backbone], stop_at=4)
    fit(sharded, FSDP2)

    # after 4 steps: the sharded checkpoint holds the adapters and the head, whole, equal to DDP's; no base weight
    at_4, ddp_at_4 = load(tmp_path / "fsdp/checkpoints/last.ckpt"), load(tmp_path / "ddp/checkpoints/epoch=1-step=4.ckpt")
    assert at_4["global_step"] == ddp_at_4["global_step"] == 4
    assert set(at_4["state_dict"]) == set(ddp_at_4["state_dict"])
    assert all(".lora_" in key or key.split(".")[1] in ("classifier", "score") for key in at_4["state_dict"])
    for key, tensor in at_4["state_dict"].items():
        assert type(tensor) is torch.Tensor and tensor.shape == ddp_at_4["state_dict"][key].shape, key
        torch.testing.assert_close(tensor, ddp_at_4["state_dict"][key], atol=1e-5, rtol=0, msg=key)
    saved = sum(t.numel() for t in at_4["state_dict"].values())
    assert saved < 10_000, saved  # the tiny base has ~1M parameters (its embeddings alone)
    assert (tmp_path / "fsdp/checkpoints/last.ckpt").stat().st_size < 200_000

    # resumed to step 6 from that checkpoint: equal to the uninterrupted DDP run, on both ranks
    fit(sharded, FSDP2)
    reference = load(tmp_path / "ddp/final0.pt")
    for rank in (0, 1):
        resumed = load(tmp_path / f"fsdp/final{rank}.pt")
        assert resumed["global_step"] == 6
        assert_same(resumed["adapter"], reference["adapter"], "adapter")

    # the sharded checkpoint loads into an unsharded module; its PEFT export equals the DDP export
    exported = [read_peft_export(export_checkpoint(tmp_path / f"{run}/checkpoints/last.ckpt", tmp_path / f"{run}-peft"))
                for run in ("fsdp", "ddp")]
    assert exported[0][0] == exported[1][0]
    assert_same(exported[0][1], exported[1][1], "export")


@pytest.mark.parametrize("method", ["AdaLoRAModule", "SensitivityLoRAModule", "HyperAdaLoRAModule", "HyperLoRAModule"])
def test_rank_machinery_sharded_equals_ddp(method, tiny_bert, tmp_path):
    """AdaLoRA: importance EMAs and masks from whole (gathered) P, Λ, Q and gradients, the same on both ranks and
    equal to DDP's, pruned triplets truncated in the sharded Λ. Sensitivity-LoRA: calibration runs in setup, before
    configure_model shards, so its statistics (per-module scores) and ranks equal DDP's. HyperAdaLoRA: the base
    factors stay whole (replicated), the generators and base factors get DDP's averaged gradients, so generators,
    factors and masks equal DDP's; HyperLoRA likewise. The hypernetwork methods clip gradients (norm 0.05), over
    sharded and replicated gradients together."""
    clip = ["--trainer.gradient_clip_val", "0.05"] if method.startswith("Hyper") else []
    for run, strategy in (("ddp", DDP), ("fsdp", FSDP2)):
        fit(config(tmp_path / run, tiny_bert, TARGETS["tiny_bert"], method=method), strategy, *clip)
    reference = load(tmp_path / "ddp/final0.pt")
    for rank in (0, 1):
        sharded = load(tmp_path / f"fsdp/final{rank}.pt")
        assert_same(sharded["adapter"], reference["adapter"], "adapter")
        assert_same(sharded.get("masks"), reference.get("masks"), "masks")
        assert_same(sharded["allocation"], reference["allocation"], "allocation")
        assert_same(sharded["callbacks"].get("RankPruningScheduler"), reference["callbacks"].get("RankPruningScheduler"))
    if method in ("AdaLoRAModule", "HyperAdaLoRAModule"):
        assert 0 < sum(int((m == 0).sum()) for m in reference["masks"].values())  # triplets were pruned
    if method.startswith("Hyper"):  # the generators trained: their zero-initialised output layers moved
        outputs = [t for k, t in reference["adapter"].items() if k.startswith("hypernet.") and ".out_proj." in k]
        assert outputs and all(t.abs().max() > 0 for t in outputs), [k for k in reference["adapter"] if "hypernet" in k]
    if method == "SensitivityLoRAModule":
        scores = [load(tmp_path / f"{run}/checkpoints/last.ckpt")["sensitivity_lora"]["report"]["scores"]
                  for run in ("fsdp", "ddp")]
        assert scores[0] == scores[1] and len({score["theta"] for score in scores[0].values()}) > 1, scores


@pytest.mark.parametrize("method", ["LoRAModule", "HyperAdaLoRAModule"])
def test_base_read_by_rank0_only_trains_as_ddp(method, tiny_llama, tmp_path):
    """``base_from_rank0``: rank 1 builds the Llama empty (meta device) and gets every tensor from rank 0 after
    sharding: base shards, rotary frequencies (non-persistent buffers), the randomly initialised score head, the
    adapters, and HyperAdaLoRA's hypernetwork (outside the backbone, its initial values drawn from an RNG that rank 1
    no longer shares). Any of them wrong on rank 1 changes the averaged gradients: the adapters after 6 steps equal
    DDP's (every process reading the base) on both ranks."""
    clip = ["--trainer.gradient_clip_val", "0.05"] if method.startswith("Hyper") else []
    fit(config(tmp_path / "ddp", tiny_llama, TARGETS["tiny_llama"], method=method), DDP, *clip)
    fit(config(tmp_path / "fsdp", tiny_llama, TARGETS["tiny_llama"], method=method), FSDP2, *clip,
        "--model.init_args.base_from_rank0", "true")
    reference = load(tmp_path / "ddp/final0.pt")
    for rank in (0, 1):
        sharded = load(tmp_path / f"fsdp/final{rank}.pt")
        assert sharded["global_step"] == 6 and sharded["base_was_empty"] == (rank == 1) and not reference["base_was_empty"]
        assert_same(sharded["adapter"], reference["adapter"], "adapter")
        assert_same(sharded.get("masks"), reference.get("masks"), "masks")


# ----------------------------------------------------------------- refused before training (one process, in-process)
@pytest.fixture
def one_process_sharded_trainer(tmp_path):
    """A 1-process ModelParallelStrategy Trainer (gloo); its process group and environment are undone afterwards."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    with one_process_group():
        yield lambda: quiet_trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                                    max_steps=1, default_root_dir=tmp_path)


class SkipsSharding(LoRAModule):
    def configure_model(self) -> None:  # forgets super().configure_model()
        pass


def test_a_module_not_built_for_sharding_is_refused_before_training(tiny_bert, one_process_sharded_trainer):
    module = SkipsSharding(backbone=tiny_bert, rank=2, target_modules=["query"])
    with pytest.raises(ShardingError, match="ddp"):
        one_process_sharded_trainer().fit(module, batch_loader(2))
    assert all(p.grad is None for p in module.parameters())


def test_blocks_are_found_by_no_split_modules_or_the_layer_list_else_a_clear_error(tiny_llama):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert [type(b).__name__ for b in transformer_blocks(llama)] == ["LlamaDecoderLayer"] * 2
    llama._no_split_modules = None
    assert transformer_blocks(llama) == list(llama.model.layers)
    with pytest.raises(ShardingError, match="Cannot find the transformer blocks of MLP"):
        transformer_blocks(MLP())


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
