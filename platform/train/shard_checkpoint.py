"""Value-table shards on disk: one file per table and shard, re-sharded on load.

`save_sharded_values` writes `values-t{table}-p{P}-r{rank}.pt`, holding the shard, its
(P, rank, columns) and optionally the value optimizer's state; `load_values` reads the column
ranges a model needs from whatever P wrote them (re-sharding P=2 -> P=1 or P=4), memory-mapped,
one shard at a time, with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlayers.kernels.sharded_values import ShardedValueTable
from memlayers.platform.train.checkpoint import atomic_save

FORMAT = 1


def _layout(table: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(P, rank, columns) of a table: a plain ValueTable is the single shard of itself."""
    if isinstance(table, ShardedValueTable):
        return table.shards, table.shard_rank, table.columns
    return 1, 0, (0, table.value_dim)


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
        atomic_save(payload, target)
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
