"""Memory parallelism composed with data parallelism: the 2-D mesh, sharding, gradients, checkpoints.

The W = D x P ranks form a mesh: rank = d * P + m. The P consecutive ranks of row d are a
memory-parallel group (they share one value table split by columns, `ShardedValueTable`); the
D ranks of column m are a data-parallel group (they hold the same shard m). Every rank reads its
own micro-batch, exactly as in plain data parallelism, so data loading is unchanged: shard the
data over all W ranks.

Gradients, with each rank's loss the mean over its own tokens:
- dense parameters are replicated on all W ranks: DDP averages them
  over the world; the value tables are excluded from DDP (`_ddp_params_and_buffers_to_ignore`);
- a value shard's gradient on rank (d, m) is the sum over the P tokens-owners of group d; the
  global-mean gradient is (1/P) x the mean over the D replicas of shard m:
  `ParallelPlan.sync_value_grads` (row-sparse: an all-gather of rows over the DP group);
- the value-gradient norm for clipping sums the shards' squares over the memory-parallel group
  (`ParallelPlan.clip_value_grads_`).
Element-wise value optimizers (LazyAdam, AdamW, SGD) are then exact on column shards. Row-wise
Adagrad's per-row accumulator sees only this rank's columns (a per-shard row statistic).

Shard checkpoints are `shard_checkpoint.py`, value bytes per rank `rank_memory.py`, the local
gloo launcher `local_launch.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from memlayers.config_schema import ConfigError
from memlayers.kernels.sharded_values import ShardedValueTable
from memlayers.kernels.value_optim import allreduce_value_grads_
from memlayers.platform.train.shard_checkpoint import save_sharded_values


# ---- the mesh ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mesh:
    world_size: int
    memory_parallel: int  # P
    rank: int

    @property
    def data_parallel(self) -> int:  # D
        return self.world_size // self.memory_parallel

    @property
    def mp_rank(self) -> int:  # m: which shard this rank holds
        return self.rank % self.memory_parallel

    @property
    def dp_rank(self) -> int:  # d: which memory-parallel group this rank is in
        return self.rank // self.memory_parallel

    def mp_groups(self) -> list[list[int]]:
        p = self.memory_parallel
        return [list(range(d * p, (d + 1) * p)) for d in range(self.data_parallel)]

    def dp_groups(self) -> list[list[int]]:
        p = self.memory_parallel
        return [list(range(m, self.world_size, p)) for m in range(p)]


def mesh_layout(world_size: int, memory_parallel: int, rank: int = 0) -> Mesh:
    """The D x P mesh; P must divide the world size."""
    if memory_parallel < 1 or world_size % memory_parallel:
        raise ConfigError("resources.memory_parallel",
                          f"must be >= 1 and divide the {world_size} workers, got {memory_parallel}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    return Mesh(world_size, memory_parallel, rank)


def build_groups(mesh: Mesh) -> tuple[Any, Any]:
    """(memory-parallel group, data-parallel group) of this rank; every rank must call this."""
    mp_group, _ = dist.new_subgroups_by_enumeration(mesh.mp_groups())
    dp_group, _ = dist.new_subgroups_by_enumeration(mesh.dp_groups())
    return mp_group, dp_group


# ---- sharding a model --------------------------------------------------------------------------
def _shard_of(table: nn.Module, mp_group) -> ShardedValueTable:
    if isinstance(table, ShardedValueTable):
        raise ValueError("the model's value tables are already sharded")
    if table.weight.device.type == "meta":
        with torch.device("meta"):
            return ShardedValueTable(table.slots, table.value_dim, mp_group, table.sparse_grad).to(table.weight.dtype)
    return ShardedValueTable.from_full(table.weight.detach(), mp_group, table.sparse_grad)


def shard_memory(model: nn.Module, mp_group) -> nn.Module:
    """Replace every value table of a Transformer, in place, by this rank's column shard of it.

    Call before building optimizers. A model on the meta device gets empty shards (initialise
    them with `init_weights()` after `to_empty`); otherwise the shard is cut from the full table.
    """
    for table in model.value_tables():
        sharded = _shard_of(table, mp_group)
        if getattr(model, "memory_values", None) is table:
            model.memory_values = sharded
        for layer in model.memory_layers():
            if layer._shared_values and layer._shared_values[0] is table:
                layer._shared_values[0] = sharded
            elif not layer._shared_values and layer.values is table:
                layer.values = sharded
    return model


def value_param_names(module: nn.Module, value_params: Iterable[torch.Tensor]) -> list[str]:
    """Names (in `module`) of the value-table parameters: what DDP must ignore."""
    ids = {id(p) for p in value_params}
    return sorted(name for name, p in module.named_parameters() if id(p) in ids)


def ignore_values_in_ddp(module: nn.Module, value_params: Iterable[torch.Tensor]) -> list[str]:
    """Mark the value parameters as ignored by a DDP wrapper built on `module` later (also Ray's prepare_model)."""
    names = value_param_names(module, value_params)
    module._ddp_params_and_buffers_to_ignore = names
    return names


# ---- the plan the trainer uses -----------------------------------------------------------------
@dataclass
class ParallelPlan:
    """The groups of this rank and how its gradients are synchronised (module docstring)."""

    mesh: Mesh
    mp_group: Any
    dp_group: Any
    value_params: list[nn.Parameter]

    @property
    def memory_parallel(self) -> int:
        return self.mesh.memory_parallel

    @property
    def data_parallel(self) -> int:
        return self.mesh.data_parallel

    def wrap_ddp(self, module: nn.Module, **kwargs: Any) -> nn.Module:
        """DDP over the world for the dense parameters, value tables ignored."""
        from torch.nn.parallel import DistributedDataParallel  # deferred: only distributed runs need it

        ignore_values_in_ddp(module, self.value_params)
        return DistributedDataParallel(module, **kwargs)

    def sync_value_grads(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Value-shard gradients -> the gradient of the global mean loss (after `loss.backward()`)."""
        params = list(self.value_params if params is None else params)
        allreduce_value_grads_(params, group=self.dp_group)
        if self.memory_parallel > 1:
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.div(self.memory_parallel)

    def value_grad_norm(self, params: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """2-norm of the whole tables' gradients (the shards' squares summed over the group)."""
        params = list(self.value_params if params is None else params)
        squares = torch.zeros((), dtype=torch.float32, device=params[0].device if params else None)
        for p in params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
            grad = p.grad._values() if p.grad.is_sparse else p.grad
            squares = squares + torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        if self.memory_parallel > 1:
            dist.all_reduce(squares, group=self.mp_group)
        return squares.sqrt()

    def clip_value_grads_(self, max_norm: float, params: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """Clip the value gradients to a global norm of `max_norm`; -> the norm before clipping."""
        params = list(self.value_params if params is None else params)
        norm = self.value_grad_norm(params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                (p.grad._values() if p.grad.is_sparse else p.grad).mul_(coef.to(p.grad.dtype))
        return norm

    def save_values(self, model: nn.Module, directory: str | Path,
                    optimizer: torch.optim.Optimizer | None = None) -> list[Path]:
        """Write this rank's shards (only the first data-parallel replica writes; the others hold copies)."""
        if self.mesh.dp_rank != 0:
            return []
        return save_sharded_values(model, directory, optimizer)


def setup_parallel(model: nn.Module, memory_parallel: int) -> ParallelPlan:
    """Build the D x P mesh over the initialised default process group and shard `model`'s tables.

    Every rank calls this, after `dist.init_process_group` and before building optimizers and
    DDP. The value parameters are marked as ignored by DDP on `model` (wrap other modules with
    `plan.wrap_ddp` or `ignore_values_in_ddp`).
    """
    if not dist.is_initialized():
        raise RuntimeError("setup_parallel needs torch.distributed initialised (init_process_group)")
    mesh = mesh_layout(dist.get_world_size(), memory_parallel, dist.get_rank())
    mp_group, dp_group = build_groups(mesh)
    if memory_parallel > 1:
        shard_memory(model, mp_group)
    value_params = list(model.value_parameters())
    ignore_values_in_ddp(model, value_params)
    return ParallelPlan(mesh, mp_group, dp_group, value_params)
