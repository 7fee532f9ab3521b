"""FSDP2 sharding of an adapter module's backbone, for Lightning's ``ModelParallelStrategy`` (docs/large_models.md).

Each transformer block is one ``fully_shard`` unit (its frozen base weights and its adapters together: FSDP2 reduces
gradients only for the parameters that have them), the backbone's remaining parameters (embeddings, final norm,
trained head) are the root unit. While sharded, the module's ``state_dict`` holds only the adapter state, so that a
checkpoint gathers the adapters and heads in full and never the frozen base.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from torch import Tensor, nn

from lora_lightning.allocation.importance import RankUnit

DATA_PARALLEL = "data_parallel"
TENSOR_PARALLEL = "tensor_parallel"


class ShardingError(ValueError):
    """A module or backbone that cannot be sharded as asked."""


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks: modules whose class is named in ``_no_split_modules`` (``transformers``'
    own list of blocks that must stay whole), else the children of its longest ``ModuleList`` of one class."""
    names = set(getattr(backbone, "_no_split_modules", None) or ())
    blocks = [m for m in backbone.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in backbone.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    if lists:
        return list(max(lists, key=len))
    raise ShardingError(
        f"Cannot find the transformer blocks of {type(backbone).__name__} to shard: it names no _no_split_modules and "
        "has no ModuleList of identical layers. Train it with strategy 'ddp', or override configure_model to shard it."
    )


def data_parallel_mesh(mesh):
    """The 1-D data-parallel mesh of a ``ModelParallelStrategy`` mesh; tensor parallelism is refused."""
    names = mesh.mesh_dim_names or ()
    if TENSOR_PARALLEL in names and mesh[TENSOR_PARALLEL].size() > 1:
        raise ShardingError(
            f"lora-lightning shards by data parallelism only, but the strategy has tensor_parallel_size="
            f"{mesh[TENSOR_PARALLEL].size()}; set ModelParallelStrategy(data_parallel_size=<processes>, "
            "tensor_parallel_size=1)."
        )
    return mesh[DATA_PARALLEL] if DATA_PARALLEL in names else mesh


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def check_sharded(module: nn.Module, backbone: nn.Module) -> None:
    """Under ``ModelParallelStrategy`` (``module.device_mesh`` set) the backbone must be sharded by now: otherwise no
    process would exchange gradients. A subclass whose ``configure_model`` skipped the base class's gets this error."""
    if getattr(module, "device_mesh", None) is not None and not is_sharded(backbone):
        raise ShardingError(
            f"{type(module).__name__}.configure_model did not shard the backbone under ModelParallelStrategy, so the "
            "processes would train apart. Call super().configure_model() in your override (or shard it with "
            "lora_lightning.sharding.shard_backbone), or train with strategy 'ddp'."
        )


def shard_backbone(backbone: nn.Module, mesh, replicated: Iterable[nn.Parameter] = ()) -> None:
    """``fully_shard`` every transformer block of ``backbone`` over the data-parallel part of ``mesh``, then the
    backbone itself as the root unit. Parameters in ``replicated`` stay whole, plain tensors on every process
    (FSDP2's ``ignored_params``): FSDP2 neither gathers nor reduces them, their owner reduces their gradients."""
    from torch.distributed.fsdp import fully_shard

    dp_mesh = data_parallel_mesh(mesh)
    ignored = set(replicated)
    for block in reversed(transformer_blocks(backbone)):  # a block nested in another one is sharded first
        fully_shard(block, mesh=dp_mesh, ignored_params=ignored)
    fully_shard(backbone, mesh=dp_mesh, ignored_params=ignored)


def launch_rank() -> int:
    """This process's global rank as its launcher announces it, before any process group exists: ``RANK``
    (torchrun), else ``SLURM_PROCID`` (srun), else Lightning's own launcher's ``NODE_RANK``/``LOCAL_RANK`` (0 for
    the first process on the first node, 1 for any other). A single process, launched by nobody, is rank 0."""
    for variable in ("RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return int(any(os.environ.get(v, "0") not in ("", "0") for v in ("NODE_RANK", "LOCAL_RANK")))


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def broadcast_from_rank0(module: nn.Module, rank0_state: dict[str, Tensor], device: torch.device) -> None:
    """Give every process rank 0's values of every tensor of ``module``, once its backbone is sharded
    (:func:`shard_backbone`): ``rank0_state`` is rank 0's ``module.state_dict()`` taken before sharding (consumed:
    each entry is dropped once sent), ``{}`` on the other processes, whose backbone (and what is built from it) was
    built empty on the meta device (``base_from_rank0``). One tensor at a time is broadcast whole; each process
    copies its own shard of it (or all of it, if not sharded) and lets it go, so no process ever holds more than its
    shards plus the largest single tensor. Every buffer, also non-persistent ones such as rotary frequencies (not in
    a state dict), is broadcast as well. A collective: every process calls it."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    for child in module.children():
        if has_meta_tensors(child):
            child.to_empty(device=device)  # storage only: every value comes from rank 0 below
    module.to(device)
    rank0 = dist.get_rank() == 0
    with torch.no_grad():
        for key, target in module.state_dict().items():  # the same keys, in the same order, on every process
            if not isinstance(target, Tensor):
                continue
            source = rank0_state.pop(key) if rank0 else None
            whole = (source.to(device) if rank0 else
                     torch.empty(target.shape, dtype=target.dtype, device=device))
            dist.broadcast(whole, src=0)
            if isinstance(target, DTensor):  # slice this process's shard locally (no further communication)
                whole = distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(whole)
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def keep_only_in_state_dict(module: nn.Module, keys: Callable[[], Iterable[str]]) -> None:
    """From now on ``module.state_dict()`` holds only the entries named by ``keys()`` (read at each call)."""

    def drop_others(owner: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        kept = {f"{prefix}{key}" for key in keys()}
        for key in [k for k in state_dict if k.startswith(prefix) and k not in kept]:
            del state_dict[key]

    module.register_state_dict_post_hook(drop_others)


def local_shard(tensor: Tensor) -> Tensor:
    """This process's part of a sharded (DTensor) ``tensor``; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered_units(units: dict[str, RankUnit]) -> dict[str, RankUnit]:
    """``units`` with sharded (DTensor) ``P``, ``Λ``, ``Q`` replaced by whole detached copies that carry their whole
    gradient in ``.grad``, so importance and masks are computed from full tensors, identically on every process (a
    collective: every process calls it). Unsharded units are returned as they are; ``mask`` and ``stored_lam`` are
    always the module's own (pruning writes into them)."""
    return {name: replace(unit, P=_whole_with_grad(unit.P), lam=_whole_with_grad(unit.lam), Q=_whole_with_grad(unit.Q))
            for name, unit in units.items()}


def _whole_with_grad(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    whole = tensor.detach().full_tensor()
    whole.grad = None if tensor.grad is None else tensor.grad.full_tensor()
    return whole


def clip_sharded_gradients_(parameters: Iterable[nn.Parameter], clip_val: float, algorithm: str = "norm") -> None:
    """Clip the gradients of ``parameters`` as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` would on
    whole tensors, where some gradients are FSDP2 shards (DTensor) and others plain tensors replicated on every process
    (which torch's clipping refuses to mix). ``norm``: the 2-norm of the whole gradient is that of the two groups'
    norms, the sharded group's reduced over its shards (one scalar all-reduce); every gradient is scaled by
    ``min(1, clip_val / (norm + 1e-6))``, the same on every process. ``value``: each element clamped to ±clip_val."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if algorithm == "value":
        for grad in grads:
            grad.clamp_(-clip_val, clip_val)
        return
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(group) for group in (sharded, plain) if group]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    if not norms:
        return
    scale = min(1.0, clip_val / (float(torch.linalg.vector_norm(torch.stack(norms))) + 1e-6))
    for grad in grads:
        grad.mul_(scale)
