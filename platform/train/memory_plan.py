"""Per-GPU memory of a run's plan: weights, gradients, optimizer states, value shards, activations.

Dense weights are fp32 masters with fp32 gradients and two fp32 Adam moments (16 bytes a
parameter); under DDP every rank holds all of them, under FSDP a shard of 1/S (S the shard degree)
plus the bf16 weights of the two blocks gathered at a time (one computing, one prefetched). Value
tables hold 1/P of their columns and their optimizer state (`rank_memory.py`); their gradients are
row-sparse (the rows one micro-batch reads). Activations are an estimate for bf16 training without
recomputation and with a fused attention: 34 bytes per token per model dim per layer (the
per-layer count of Korthikanti et al. 2022, "Reducing Activation Recomputation", without the s^2
attention term), plus fp32 logits and their gradient. A plan fits when what the parallel strategy
holds (weights, gradients, optimizer states, value shards) fits the GPU; the activation estimate is
printed beside it, not enforced, since micro-batching or recomputation changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlayers.config_schema import ConfigError
from memlayers.models.accounting import account
from memlayers.models.config import ModelConfig
from memlayers.platform.train.rank_memory import memory_per_rank
from memlayers.platform.train.run_config import RunConfig

GB = 1e9
DENSE_BYTES_PER_PARAM = {"weights": 4, "gradients": 4, "optimizer": 8}
ACTIVATION_BYTES_PER_TOKEN_DIM_LAYER = 34
GATHERED_BLOCKS = 2  # FSDP: the block computing and the one prefetched


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU holds under a run's resources (module docstring)."""

    strategy: str          # "ddp" or "fsdp/S"
    weights: float
    gradients: float
    optimizer: float
    value_shards: float
    activations: float
    limit: float           # resources.gpu_memory_gb in bytes

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.value_shards + self.activations

    @property
    def state(self) -> float:
        """What the parallel strategy decides: weights, gradients, optimizer states and value shards."""
        return self.weights + self.gradients + self.optimizer + self.value_shards

    @property
    def fits(self) -> bool:
        # activations are an estimate that micro-batching or recomputation changes: shown, not enforced
        return self.state <= self.limit

    def summary(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.1f}" for k in
                          ("weights", "gradients", "optimizer", "value_shards", "activations"))
        return (f"{self.strategy}: {self.state / GB:.1f} GB per GPU of {self.limit / GB:g} held, "
                f"{self.total / GB:.1f} with activations ({parts})")


def memory_plan(cfg: RunConfig, model: ModelConfig, fsdp: bool | int | None = None) -> MemoryPlan:
    """The per-GPU plan of `cfg` (its `resources.fsdp`, or `fsdp` to ask "what if")."""
    res = cfg.resources
    fsdp = res.fsdp if fsdp is None else fsdp
    acc = account(model, cfg.data.seq_len)
    dense = acc.total_params - acc.memory_value_params
    data_parallel = res.workers // res.memory_parallel
    degree = (data_parallel if fsdp is True else int(fsdp)) if fsdp else 1
    block = (acc.total_params - acc.memory_value_params - acc.embedding_params) / max(model.n_layers, 1)
    gathered = GATHERED_BLOCKS * block * 2 if degree > 1 else 0.0
    values = memory_per_rank(model, res.memory_parallel, cfg.train.value_optimizer) if acc.memory_value_params else None
    tokens = max(cfg.train.batch_size // res.workers, 1) * cfg.data.seq_len
    activations = tokens * (ACTIVATION_BYTES_PER_TOKEN_DIM_LAYER * model.dim * model.n_layers + 8 * model.vocab_size)
    per = {k: dense * b / degree for k, b in DENSE_BYTES_PER_PARAM.items()}
    return MemoryPlan("ddp" if degree == 1 else f"fsdp/{degree}", per["weights"] + gathered, per["gradients"],
                      per["optimizer"], float(values.total_bytes) if values else 0.0, float(activations),
                      res.gpu_memory_gb * GB)


def check_memory_plan(cfg: RunConfig, model: ModelConfig) -> MemoryPlan:
    """The plan; ConfigError naming `resources` when a GPU run's plan does not fit, saying what would."""
    plan = memory_plan(cfg, model)
    if plan.fits or cfg.resources.gpus_per_worker <= 0:
        return plan
    hint = "more workers or memory parallelism"
    if not cfg.resources.fsdp:
        sharded = memory_plan(cfg, model, fsdp=True)
        hint = f"fsdp: true would hold {sharded.state / GB:.1f} GB per GPU" + ("" if sharded.fits else f"; {hint}")
    raise ConfigError("resources", f"the plan needs {plan.summary()}, "
                                   f"over gpu_memory_gb={cfg.resources.gpu_memory_gb:g}"
                                   f" ({hint})")


def cell_memory_plan(model_spec, data, train, resources, vocab_size: int) -> MemoryPlan:
    """The per-GPU plan of a study cell (its model spec, data, train and resources sections)."""
    cfg = RunConfig(model=model_spec, data=data, train=train, resources=resources)
    return memory_plan(cfg, model_spec.build(vocab_size, data.seq_len))
