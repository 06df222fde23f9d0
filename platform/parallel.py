"""Memory parallelism composed with data parallelism: the 2-D mesh, sharding, gradients, checkpoints.

The W = D x P ranks form a mesh: rank = d * P + m. The P consecutive ranks of row d are a
memory-parallel group (they share one value table split by columns, `ShardedValueTable`); the
D ranks of column m are a data-parallel group (they hold the same shard m). Every rank reads its
own micro-batch, exactly as in plain data parallelism, so data loading is unchanged: shard the
data over all W ranks.

Gradients, with each rank's loss the mean over its own tokens:
- dense parameters are replicated on all W ranks: DDP (or `allreduce_dense_grads`) averages them
  over the world; the value tables are excluded from DDP (`_ddp_params_and_buffers_to_ignore`);
- a value shard's gradient on rank (d, m) is the sum over the P tokens-owners of group d; the
  global-mean gradient is (1/P) x the mean over the D replicas of shard m:
  `ParallelPlan.sync_value_grads` (row-sparse: an all-gather of rows over the DP group);
- the value-gradient norm for clipping sums the shards' squares over the memory-parallel group
  (`ParallelPlan.clip_value_grads_`).
Element-wise value optimizers (LazyAdam, AdamW, SGD) are then exact on column shards. Row-wise
Adagrad's per-row accumulator sees only this rank's columns (a per-shard row statistic).

Checkpoints: `save_sharded_values` writes one file per table and shard,
`values-t{table}-p{P}-r{rank}.pt`, holding the shard, its (P, rank, columns) and optionally the
value optimizer's state; `load_values` reads the column ranges a model needs from whatever P
wrote them (re-sharding P=2 -> P=1 or P=4), memory-mapped, one shard at a time.

`memory_per_rank` is the accounting of value-table bytes (+ optimizer state) per rank.
`run_local(fn, world_size)` runs `fn(rank, world_size, ...)` in gloo processes on 127.0.0.1.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from memlayers.kernels.sharded_values import ShardedValueTable, column_range
from memlayers.kernels.value_optim import allreduce_value_grads_
from memlayers.models.accounting import account
from memlayers.models.config import ModelConfig
from memlayers.models.schema import ConfigError

FORMAT = 1


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
        from torch.nn.parallel import DistributedDataParallel

        ignore_values_in_ddp(module, self.value_params)
        return DistributedDataParallel(module, **kwargs)

    def allreduce_dense_grads(self, module: nn.Module) -> None:
        """The manual alternative to DDP: average the dense gradients over the world."""
        ids = {id(p) for p in self.value_params}
        for p in module.parameters():
            if id(p) not in ids and p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.mesh.world_size)

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

    def save_values(self, model: nn.Module, directory: str | Path, optimizer: torch.optim.Optimizer | None = None) -> list[Path]:
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


# ---- checkpoints --------------------------------------------------------------------------------
def _layout(table: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(P, rank, columns) of a table: a plain ValueTable is the single shard of itself."""
    if isinstance(table, ShardedValueTable):
        return table.shards, table.shard_rank, table.columns
    return 1, 0, (0, table.value_dim)


def _atomic_save(payload: dict, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sharded_values(model: nn.Module, directory: str | Path,
                        optimizer: torch.optim.Optimizer | None = None) -> list[Path]:
    """Write this rank's shard of every value table (and its optimizer state) -> the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, table in enumerate(model.value_tables()):
        p, rank, (lo, hi) = _layout(table)
        state = optimizer.state.get(table.weight) if optimizer is not None else None
        payload = {"format": FORMAT, "table": index, "p": p, "rank": rank, "slots": table.slots,
                   "value_dim": table.value_dim, "columns": [lo, hi], "weight": table.weight.detach().cpu(),
                   "optimizer_state": {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
                   if state else None}
        target = directory / f"values-t{index}-p{p}-r{rank}.pt"
        _atomic_save(payload, target)
        written.append(target)
    return written


def _saved_shards(directory: Path, index: int) -> list[Path]:
    files = sorted(directory.glob(f"values-t{index}-p*-r*.pt"))
    sizes = {f.name.split("-")[2] for f in files}
    if not files:
        raise FileNotFoundError(f"no value shards of table {index} in {directory}")
    if len(sizes) != 1:
        raise ValueError(f"{directory} holds shards of table {index} written at several P: {sorted(sizes)}")
    p = int(next(iter(sizes))[1:])
    if len(files) != p:
        raise ValueError(f"{directory}: table {index} was written at P={p} but {len(files)} shard files are present")
    return files


def load_values(model: nn.Module, directory: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load every value table's columns this rank holds, from shards written at any P.

    With `optimizer`, its state for the table is restored too: tensors shaped like a shard are
    re-cut by columns, others (per-row step counts, scalars) come from the first shard read.
    """
    directory = Path(directory)
    for index, table in enumerate(model.value_tables()):
        _, _, (lo, hi) = _layout(table)
        state: dict[str, Any] = {}
        for path in _saved_shards(directory, index):
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if (saved["slots"], saved["value_dim"]) != (table.slots, table.value_dim):
                raise ValueError(f"{path.name}: table is {saved['slots']} x {saved['value_dim']}, "
                                 f"the model's is {table.slots} x {table.value_dim}")
            a, b = saved["columns"]
            start, stop = max(lo, a), min(hi, b)
            if start >= stop:
                continue
            with torch.no_grad():
                table.weight[:, start - lo:stop - lo].copy_(saved["weight"][:, start - a:stop - a])
            if optimizer is not None and saved["optimizer_state"]:
                _merge_state(state, saved["optimizer_state"], saved["weight"].shape, table.weight,
                             (start - lo, stop - lo), (start - a, stop - a))
        if optimizer is not None and state:
            optimizer.state[table.weight] = state


def _merge_state(state: dict, saved: dict, saved_shape: torch.Size, weight: torch.Tensor,
                 target_cols: tuple[int, int], source_cols: tuple[int, int]) -> None:
    for key, value in saved.items():
        if torch.is_tensor(value) and value.shape == saved_shape:
            if key not in state:
                state[key] = torch.zeros(weight.shape, dtype=value.dtype, device=weight.device)
            state[key][:, target_cols[0]:target_cols[1]] = value[:, source_cols[0]:source_cols[1]]
        elif key not in state:
            state[key] = value.clone().to(weight.device) if torch.is_tensor(value) else value


# ---- accounting ---------------------------------------------------------------------------------
OPTIMIZER_STATES = {"lazy_adam": 2, "adamw": 2, "row_adagrad": 0, "sgd": 0}


@dataclass(frozen=True)
class ValueMemory:
    """Bytes of the value tables held by ONE rank of a memory-parallel group of `memory_parallel`."""

    memory_parallel: int
    value_params: int      # per rank: N * V / P summed over tables
    param_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.optimizer_bytes


def memory_per_rank(cfg: ModelConfig, memory_parallel: int, value_optimizer: str = "lazy_adam", *,
                    param_bytes: int = 4, state_bytes: int = 4) -> ValueMemory:
    """Value-table parameters and optimizer state per rank under column sharding over P ranks.

    lazy_adam: two moments per element + an int32 step per row; adamw: two moments;
    row_adagrad: one fp32 accumulator per row (every column shard keeps all N rows); sgd: none.
    """
    if value_optimizer not in OPTIMIZER_STATES:
        raise ConfigError("train.value_optimizer", f"must be one of {', '.join(OPTIMIZER_STATES)}, got {value_optimizer!r}")
    total = account(cfg, 1).memory_value_params
    if total:
        column_range(cfg.dim, memory_parallel, 0)  # validates that P divides V
    per_rank = total // memory_parallel
    rows = total // cfg.dim
    optimizer = OPTIMIZER_STATES[value_optimizer] * per_rank * state_bytes
    if value_optimizer in ("lazy_adam", "row_adagrad"):
        optimizer += rows * 4
    return ValueMemory(memory_parallel, per_rank, per_rank * param_bytes, optimizer)


# ---- local launcher -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, backend: str, results: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(Path(results) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes joined by `backend` on 127.0.0.1.

    `fn` must be importable (a module-level function); -> the ranks' return values. Workers come
    from a fork server that has torch imported (started once per process, then ~0.1 s a launch);
    where there is none, they are spawned.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    with tempfile.TemporaryDirectory() as results:
        mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, results, args), nprocs=world_size,
                           join=True, start_method=method)
        out = []
        for rank in range(world_size):
            with open(Path(results) / f"rank{rank}.pkl", "rb") as handle:
                out.append(pickle.load(handle))  # written by our own child processes just now
        return out
