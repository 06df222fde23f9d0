"""A training run's config: model spec, data, optimisation, resources and tracking.

Loaded from YAML (`load_run_config`) with every field checked before Ray starts: unknown keys,
wrong types and impossible models raise `ConfigError` naming the dotted field
(`train.lr: expected a number, got 'fast' (str)`). The same dataclass is what the study
controller builds for each cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from memlayers.config_schema import ConfigError, from_dict, name_problem, parse_yaml, read_yaml, require, to_dict
from memlayers.models.config import MEMORY_PARALLEL_FAMILIES, ModelConfig
from memlayers.models.presets import BASES, build_config
from memlayers.platform.cluster.storage import uri_problem
from memlayers.platform.data.config import DataConfig
from memlayers.platform.finetune.config import FinetuneRun

# Bounds on what a config may ask for, so that validating any file answers at once.
MAX_BUDGET = {"steps": 1e9, "tokens": 1e15, "flops": 1e27}
MAX_BATCH = 2**20
# Seeds reach torch.manual_seed, numpy and the tracking store's integer columns: a signed 64-bit
# integer fits all of them.
MAX_SEED = 2**63 - 1


@dataclass
class ModelSpec:
    base: str = "nano"                  # a preset from memlayers.models.presets.BASES
    family: str = "memory_plus"         # dense | moe | pkm | memory_plus
    memory_slots: Optional[Union[int, str]] = None  # memory families: slots or a size name ("1m")
    experts: Optional[int] = None       # moe: number of experts
    memory: dict[str, Any] = field(default_factory=dict)    # MemoryConfig overrides
    moe: dict[str, Any] = field(default_factory=dict)       # MoEConfig overrides
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides (dim, n_layers, ...)

    def build(self, vocab_size: int, seq_len: int, path: str = "model") -> ModelConfig:
        """The full ModelConfig for a tokenizer's vocabulary and the run's sequence length."""
        fields = {"vocab_size": vocab_size, **self.overrides}
        fields["max_seq_len"] = max(seq_len, fields.get("max_seq_len", 0))
        try:
            return build_config(self.base, self.family, memory_slots=self.memory_slots, experts=self.experts,
                                memory=self.memory, moe=self.moe, **fields)
        except ConfigError as error:
            raise ConfigError(f"{path}.{error.path.removeprefix('model.')}", error.reason) from None
        except TypeError as error:
            raise ConfigError(f"{path}.memory", str(error)) from None

    def validate(self, path: str = "model") -> None:
        require(self.base in BASES, f"{path}.base", f"unknown base {self.base!r} (expected one of {', '.join(BASES)})")
        self.build(vocab_size=BASES[self.base]["vocab_size"], seq_len=1, path=path)


@dataclass
class TrainConfig:
    batch_size: int = 32                # sequences per optimizer step, summed over data-parallel workers
    steps: Optional[int] = None         # stop after this many steps ...
    tokens: Optional[int] = None        # ... or this many training tokens ...
    flops: Optional[float] = None       # ... or this many training FLOPs (from the accounting)
    lr: float = 3e-3                    # AdamW for every non-value parameter
    value_lr: float = 1e-3              # the value tables' own group (paper default)
    value_optimizer: Literal["lazy_adam", "row_adagrad", "adamw"] = "lazy_adam"  # the value tables' optimizer
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW's moment decays
    weight_decay: float = 0.1           # AdamW's, on matrices only (not norms or biases)
    warmup: float = 0.05                # fraction of the steps spent in linear warmup
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after the warmup
    min_lr_ratio: float = 0.1           # final lr / peak lr
    grad_clip: float = 1.0              # global norm of the non-value gradients
    value_grad_clip: float = 1.0        # norm of the value gradients, clipped separately
    eval_every: int = 100               # steps between evaluations (and at the end)
    eval_batches: int = 4               # validation batches per evaluation
    qa_eval_items: int = 512            # QA pairs scored per evaluation (0: none)
    checkpoint_every: int = 100         # steps between checkpoints (and at the end)
    log_every: int = 10                 # steps between metric logs
    seed: int = 0                       # initialisation and data order
    dtype: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    fail_at_step: Optional[int] = None  # fault-injection hook: rank 0 dies once at this step

    def budget(self) -> tuple[str, float]:
        """(kind, value) of the one budget given: steps, tokens or flops."""
        kind = next(name for name in ("steps", "tokens", "flops") if getattr(self, name) is not None)
        return kind, getattr(self, kind)

    def validate(self, path: str = "train") -> None:
        budgets = [name for name in ("steps", "tokens", "flops") if getattr(self, name) is not None]
        require(len(budgets) == 1, f"{path}.steps",
                f"give exactly one of steps, tokens, flops (got {budgets or 'none'})")
        for name in budgets:
            value = getattr(self, name)
            require(value > 0 and math.isfinite(value), f"{path}.{name}", f"must be a finite number > 0, got {value}")
            require(value <= MAX_BUDGET[name], f"{path}.{name}", f"at most {MAX_BUDGET[name]:.0e}, got {value:g}")
        require(self.batch_size <= MAX_BATCH, f"{path}.batch_size", f"at most {MAX_BATCH}, got {self.batch_size}")
        for name in ("batch_size", "eval_every", "eval_batches", "checkpoint_every", "log_every"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "value_lr"):
            require(0 < getattr(self, name) < 1, f"{path}.{name}", f"must be in (0, 1), got {getattr(self, name)}")
        require(0 <= self.warmup < 1, f"{path}.warmup", f"must be a fraction in [0, 1), got {self.warmup}")
        require(0 <= self.min_lr_ratio <= 1, f"{path}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.qa_eval_items >= 0, f"{path}.qa_eval_items", f"must be >= 0, got {self.qa_eval_items}")
        require(0 <= self.seed <= MAX_SEED, f"{path}.seed", f"must be in [0, 2^63 - 1], got {self.seed}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{path}.betas",
                f"must be two numbers in [0, 1), got {list(self.betas)}")


# Where a study cell trains: inside its Tune trial (one worker, seconds to start), on Ray Train
# (any number of workers: DDP, memory parallelism), or auto (the trial when there is one worker).
RUNNERS: tuple[str, ...] = ("auto", "trial", "train")


@dataclass
class ResourcesConfig:
    workers: int = 1                    # Ray Train workers (data-parallel x memory-parallel)
    cpus_per_worker: float = 1.0        # CPUs Ray reserves for each worker
    gpus_per_worker: float = 0.0        # > 0: CUDA, bf16 autocast and NCCL
    memory_parallel: int = 1            # ranks sharing one value table (divides workers)
    max_failures: int = 2               # worker-group restarts before the run fails
    runner: str = "auto"                # a study cell's: trial (in its Tune trial), train (Ray Train), auto
    fsdp: Union[bool, int] = False      # FSDP2 of the dense weights: true (all data-parallel ranks) or a shard degree
    gpu_memory_gb: float = 80.0         # what one GPU holds: the memory plan refuses runs that do not fit

    def validate(self, path: str = "resources") -> None:
        require(self.workers >= 1, f"{path}.workers", f"must be >= 1, got {self.workers}")
        require(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        require(self.memory_parallel >= 1 and self.workers % self.memory_parallel == 0, f"{path}.memory_parallel",
                f"must divide workers={self.workers}, got {self.memory_parallel}")
        require(self.max_failures >= 0, f"{path}.max_failures", f"must be >= 0, got {self.max_failures}")
        data_parallel = self.workers // max(self.memory_parallel, 1)
        require(self.fsdp is True or self.fsdp is False or (self.fsdp >= 1 and data_parallel % self.fsdp == 0),
                f"{path}.fsdp", f"must be true, false or a shard degree dividing the {data_parallel} data-parallel "
                                f"ranks, got {self.fsdp}")
        require(self.gpu_memory_gb > 0, f"{path}.gpu_memory_gb", f"must be > 0, got {self.gpu_memory_gb}")
        require(self.runner in RUNNERS, f"{path}.runner", f"must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        require(self.runner != "trial" or self.workers == 1, f"{path}.runner",
                f"'trial' trains one worker in the trial's process, got workers={self.workers} (use train or auto)")

    def in_trial(self) -> bool:
        """Whether a study cell with these resources trains inside its Tune trial (`train/in_trial.py`)."""
        return self.runner == "trial" or (self.runner == "auto" and self.workers == 1)


@dataclass
class TrackingConfig:
    uri: Optional[str] = None           # None -> sqlite:///<workdir>/mlflow.db
    experiment: Optional[str] = None    # None -> the run's name
    run_name: Optional[str] = None      # None -> the run's name
    parent_run_id: Optional[str] = None  # a study's parent run (makes this a child run)
    run_id: Optional[str] = None        # continue this existing MLflow run (set by the study controller)
    tags: dict[str, str] = field(default_factory=dict)
    system_metrics: bool = True


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100))
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    workdir: Optional[str] = None       # None -> ./runs/<name>
    # s3://bucket/prefix, gs://..., or a shared path: checkpoints in <storage>/<name>/
    storage: Optional[str] = None
    finetune: Optional[FinetuneRun] = None  # a finetuning cell: start from a checkpoint, learn new facts

    def validate(self, path: str = "") -> None:
        require(name_problem(self.name) is None, "name", str(name_problem(self.name)))
        if self.storage is not None:
            require(uri_problem(self.storage) is None, "storage", str(uri_problem(self.storage)))
        if self.resources.memory_parallel > 1:
            require(self.model.family in MEMORY_PARALLEL_FAMILIES, "resources.memory_parallel",
                    f"needs a family with column-sharded tables ({', '.join(MEMORY_PARALLEL_FAMILIES)}), "
                    f"got {self.model.family!r}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def run_config_from_dict(data: Any) -> RunConfig:
    """Validate a mapping into a RunConfig; raises ConfigError naming the field."""
    if isinstance(data, dict) and "train" not in data:
        raise ConfigError("train", "missing section (needs at least one of steps, tokens, flops)")
    return from_dict(RunConfig, data, "")


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a run YAML (safely), apply `key.sub=value` overrides, validate."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping of run config sections, got {type(data).__name__}")
    for item in overrides or []:
        _set(data, item)
    return run_config_from_dict(data)


def _set(data: dict, item: str) -> None:
    """Apply one `--set key.sub=value` to `data`; ConfigError naming the key when it cannot apply."""
    key, equals, value = item.partition("=")
    *parents, leaf = key.split(".")
    if not equals or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {item}", "expected KEY=VALUE with a dotted key, e.g. train.steps=50")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parents[:i + 1])
            raise ConfigError(f"--set {key}", f"{section} is {node!r}, not a section with keys")
    node[leaf] = parse_yaml(value, f"--set {key}")
