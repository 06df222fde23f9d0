"""A finetuning study's `finetune:` section and what one finetuning run carries.

A finetuning study starts every cell from a pretrained checkpoint (`SourceConfig`: a cell of
another study, an MLflow run id, or a checkpoint folder) and trains it on a new population of
synthetic facts with one of `METHODS`:

- `full`: every weight; `lora`: low-rank adapters on the attention and FFN projections only;
- `memory`: the memory's value rows only; `sparse_memory`: at each step only the `top_t` value
  rows that the step's batch reads most against a background sample of the pretraining data
  (TF-IDF of slot reads, `slots.py`).

Frozen weights get no optimizer state. `FinetuneRun` is the part of a cell's run config that the
training loop reads (`loop.py`). Imports nothing of the training code: the run config holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from memlayers.config_schema import ConfigError, require

METHODS: tuple[str, ...] = ("full", "lora", "memory", "sparse_memory")
MEMORY_METHODS: tuple[str, ...] = ("memory", "sparse_memory")  # need a model with value tables
LORA_TARGETS: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and FFN projections


@dataclass
class LoraConfig:
    rank: int = 8                       # the adapters' inner dimension
    alpha: float = 16.0                 # the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # nn.Linear attribute names

    def validate(self, path: str = "finetune.lora") -> None:
        require(self.rank >= 1, f"{path}.rank", f"must be >= 1, got {self.rank}")
        require(self.alpha > 0, f"{path}.alpha", f"must be > 0, got {self.alpha}")
        require(bool(self.targets), f"{path}.targets", "name at least one projection")
        for i, name in enumerate(self.targets):
            require(name in LORA_TARGETS, f"{path}.targets[{i}]",
                    f"unknown projection {name!r} (expected one of {', '.join(LORA_TARGETS)})")


@dataclass
class SourceConfig:
    """Where a finetuning cell's weights come from: exactly one of study (+ cell), run_id, checkpoint."""

    study: Optional[str] = None         # a study name (its file beside this one in studies/) or a study file
    cell: dict[str, Any] = field(default_factory=dict)  # which of its cells: family, base, memory_slots, experts
    seed: int = 0                       # the source cell's seed
    run_id: Optional[str] = None        # an MLflow run with a final checkpoint (in tracking_uri, else this study's)
    tracking_uri: Optional[str] = None  # where run_id lives
    checkpoint: Optional[str] = None    # a checkpoint folder (state-rank0.pt and meta.json)

    def validate(self, path: str = "finetune.sources[0]") -> None:
        given = [k for k in ("study", "run_id", "checkpoint") if getattr(self, k) is not None]
        require(len(given) == 1, path,
                f"give exactly one of study, run_id, checkpoint (got {', '.join(given) or 'none'})")
        if self.study is not None:
            require(bool(self.cell), f"{path}.cell", "name the source cell (e.g. family: memory_plus, base: nano)")
        elif self.cell:
            raise ConfigError(f"{path}.cell", "a cell selects among a study's cells: give study too")
        if self.checkpoint is not None:
            folder = Path(self.checkpoint).expanduser()
            require((folder / "state-rank0.pt").is_file() and (folder / "meta.json").is_file(), f"{path}.checkpoint",
                    f"{self.checkpoint} is not a checkpoint folder (no state-rank0.pt and meta.json)")

    def label(self) -> str:
        if self.study is not None:
            return f"{self.study}:" + ",".join(f"{k}={v}" for k, v in sorted(self.cell.items())) + f",seed={self.seed}"
        return f"run:{self.run_id}" if self.run_id is not None else f"folder:{self.checkpoint}"


@dataclass
class FinetuneConfig:
    """The `finetune:` section of a study file."""

    sources: list[SourceConfig] = field(default_factory=list)  # the pretrained checkpoints; each x every method
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # memory methods skip dense sources
    new_people: int = 500               # people not in pretraining, same relations
    renderings: int = 40                # training documents per new person
    top_t: int = 512                    # sparse_memory: value rows updated per step
    background: int = 512               # sparse_memory: pretraining sequences of the background sample
    value_optimizer: Literal["adam", "sgd"] = "adam"   # memory methods' value rows: lazy Adam or plain SGD
    lr: dict[str, float] = field(default_factory=dict)        # method -> lr of its non-value weights
    value_lr: dict[str, float] = field(default_factory=dict)  # method -> lr of its value rows
    old_qa_items: int = 1000            # pretraining QA pairs scored for retention per evaluation
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters of method lora

    def validate(self, path: str = "finetune") -> None:
        require(bool(self.sources), f"{path}.sources", "name at least one source checkpoint")
        require(bool(self.methods), f"{path}.methods", "name at least one method")
        for i, method in enumerate(self.methods):
            require(method in METHODS, f"{path}.methods[{i}]",
                    f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
        for part in ("lr", "value_lr"):
            for method, value in getattr(self, part).items():
                require(method in METHODS, f"{path}.{part}.{method}",
                        f"unknown method (expected one of {', '.join(METHODS)})")
                require(isinstance(value, (int, float)) and 0 < value < 1, f"{path}.{part}.{method}",
                        f"must be a number in (0, 1), got {value!r}")
        for name in ("new_people", "renderings", "top_t", "background"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.old_qa_items >= 1, f"{path}.old_qa_items", f"must be >= 1, got {self.old_qa_items}")


@dataclass
class FinetuneRun:
    """What one finetuning cell's training loop needs (part of its run config)."""

    method: str = "full"
    checkpoint: str = ""                # the source checkpoint folder
    new_people: int = 500
    renderings: int = 40
    top_t: int = 512
    background: int = 512
    value_optimizer: Literal["adam", "sgd"] = "adam"
    old_qa_items: int = 1000
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, path: str = "finetune") -> None:
        require(self.method in METHODS, f"{path}.method", f"unknown method {self.method!r}")
