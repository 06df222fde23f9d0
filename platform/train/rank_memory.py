"""Bytes of the value tables (and their optimizer state) that one memory-parallel rank holds."""

from __future__ import annotations

from dataclasses import dataclass

from memlayers.config_schema import ConfigError
from memlayers.kernels.sharded_values import column_range
from memlayers.models.accounting import account
from memlayers.models.config import ModelConfig

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
        raise ConfigError("train.value_optimizer",
                          f"must be one of {', '.join(OPTIMIZER_STATES)}, got {value_optimizer!r}")
    total = account(cfg, 1).memory_value_params
    if total:
        column_range(cfg.dim, memory_parallel, 0)  # validates that P divides V
    per_rank = total // memory_parallel
    rows = total // cfg.dim
    optimizer = OPTIMIZER_STATES[value_optimizer] * per_rank * state_bytes
    if value_optimizer in ("lazy_adam", "row_adagrad"):
        optimizer += rows * 4
    return ValueMemory(memory_parallel, per_rank, per_rank * param_bytes, optimizer)
