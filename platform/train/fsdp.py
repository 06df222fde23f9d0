"""FSDP2 of a Transformer's dense weights beside its column-sharded value tables.

Each block, then the root (embeddings, final norm, output head), is `fully_shard`-ed over the
data-parallel dimension of the D x P mesh (`mesh.py`); the value tables are `ignored_params`: they
stay column-sharded over the memory-parallel dimension with their row-sparse gradients synced by
`ParallelPlan.sync_value_grads` and their lazy optimizers, exactly as under DDP.

The P ranks of a memory-parallel group read different tokens but hold the same dense weights, so
the dense weights are sharded over S ranks of a data-parallel column (S = the shard degree, D by
default) and replicated over the other W / S ranks (HSDP: a 2-D device mesh, replicate x shard);
gradients are then averaged over all W ranks, as DDP averages them. On CUDA parameters are
gathered in bf16 and gradients reduced in fp32.

Checkpoints keep today's format: `full_state` gathers the full model and dense-optimizer state on
every rank (a collective), `load_full_state` scatters it back into the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from memlayers.platform.train.mesh import ParallelPlan


def shard_degree(fsdp: bool | int, data_parallel: int) -> int:
    """Ranks one dense weight is split over: `fsdp: true` -> the whole data-parallel dimension."""
    degree = data_parallel if fsdp is True else int(fsdp)
    if degree < 1 or data_parallel % degree:
        raise ValueError(f"resources.fsdp: a shard degree must divide the {data_parallel} data-parallel ranks, "
                         f"got {fsdp}")
    return degree


def fsdp_mesh(plan: ParallelPlan, degree: int, device_type: str) -> DeviceMesh:
    """(replicate, shard) device mesh: shard groups are `degree` consecutive ranks of a data-parallel column."""
    world, p, d = plan.mesh.world_size, plan.memory_parallel, plan.data_parallel
    # rank = (outer * degree + inner) * P + m  ->  row (m, outer), column inner
    ranks = torch.arange(world).reshape(d // degree, degree, p).permute(2, 0, 1).reshape(-1, degree)
    if ranks.shape[0] == 1:
        return DeviceMesh(device_type, ranks[0], mesh_dim_names=("shard",))
    return DeviceMesh(device_type, ranks, mesh_dim_names=("replicate", "shard"))


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters and fp32 gradient reduction on CUDA; full fp32 elsewhere."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, plan: ParallelPlan, fsdp: bool | int, device_type: str) -> DeviceMesh:
    """Shard `model`'s blocks and root over the data-parallel dimension, value tables left out; -> the mesh.

    Call after `setup_parallel` (the tables are already column shards) and before building optimizers.
    """
    mesh = fsdp_mesh(plan, shard_degree(fsdp, plan.data_parallel), device_type)
    options: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed_precision(device_type),
                               "ignored_params": set(plan.value_params)}
    for block in model.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)
    if model.moe_layers():
        # an expert no token of this rank reached has no gradient here but has one on other ranks: every
        # rank must reduce-scatter the same tensors (zeros for its unused ones), or the collective hangs
        model.set_reduce_scatter_unused_params(True)
    return mesh


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, dense_optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(full model state, full dense-optimizer state) gathered from the shards; every rank must call it."""
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, dense_optimizer, options=_FULL)


def load_full_state(model: nn.Module, dense_optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict | None) -> None:
    """Scatter a full model (and dense-optimizer) state into this rank's shards; every rank must call it."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, dense_optimizer, optimizer_state, options=options)
