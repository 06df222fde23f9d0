"""A study's schema: the dataclasses a study file validates into, and the error that lists every problem.

A study file names the data, the grid (bases x families x memory sizes | expert counts, with
per-family overrides), the budget of each cell (tokens, steps, training FLOPs or an iso-FLOP
sweep), seeds, the learning rate (fixed or tuned), training defaults, resources per run, tracking
and fit settings. Reading and checking a file is `validate.py`; turning a study into cells is `cells.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from memlayers.config_schema import ConfigError, to_dict
from memlayers.models.config import MEMORY_FAMILIES
from memlayers.platform.cluster.storage import study_folder
from memlayers.platform.data.config import DataConfig
from memlayers.platform.finetune.config import FinetuneConfig
from memlayers.platform.tracking.conventions import sqlite_uri
from memlayers.platform.tracking.study_ref import default_workdir
from memlayers.platform.train.budget import BUDGET_KINDS
from memlayers.platform.train.run_config import ResourcesConfig, TrainConfig

LAWS: tuple[str, ...] = ("compute", "memory", "recall")  # sections of laws.study.fit_study
CLAIM_METRICS: tuple[str, ...] = ("val_loss", "qa_exact_match", "qa_answer_nll",
                                  "new_qa_exact_match", "old_qa_exact_match", "forgetting")  # the last 3: finetuning


class StudyError(ValueError):
    """A study is invalid; `errors` holds every problem (each a ConfigError naming its field)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))

    def lines(self) -> list[str]:
        return [str(e) for e in self.errors]


# ---- schema ---------------------------------------------------------------------------------

@dataclass
class FamilyGrid:
    """Per-family overrides of the grid (e.g. a different base list for memory_plus)."""

    bases: Optional[list[str]] = None           # this family's bases (None: the grid's)
    memory_sizes: Optional[list[Any]] = None    # this family's memory sizes (None: the grid's)
    experts: Optional[list[int]] = None         # this family's expert counts (None: the grid's)
    memory: dict[str, Any] = field(default_factory=dict)     # MemoryConfig options
    moe: dict[str, Any] = field(default_factory=dict)        # MoEConfig options
    model: dict[str, Any] = field(default_factory=dict)      # ModelConfig overrides
    resources: dict[str, Any] = field(default_factory=dict)  # ResourcesConfig overrides
    lr: Any = None                  # this family's fixed lr: a number, or {base: lr} (others: the top-level lr)

    def lr_for(self, base: str) -> Optional[float]:
        """This family's own learning rate on `base`, or None for the study's."""
        return self.lr.get(base) if isinstance(self.lr, dict) else self.lr


@dataclass
class GridConfig:
    bases: list[str] = field(default_factory=list)           # presets from models.presets.BASES
    families: list[str] = field(default_factory=list)        # dense | moe | pkm | memory_plus
    memory_sizes: list[Any] = field(default_factory=list)  # pkm/memory_plus: '4k' or n*n slots
    experts: list[int] = field(default_factory=list)         # moe: expert counts
    memory: dict[str, Any] = field(default_factory=dict)     # MemoryConfig options of every memory cell
    moe: dict[str, Any] = field(default_factory=dict)        # MoEConfig options of every moe cell
    model: dict[str, Any] = field(default_factory=dict)      # ModelConfig overrides of every cell
    overrides: dict[str, FamilyGrid] = field(default_factory=dict)  # family -> FamilyGrid


@dataclass
class BudgetConfig:
    """Exactly one of: tokens, steps, flops (FLOP-matched cells), iso_flops (a sweep)."""

    tokens: Optional[float] = None      # training tokens of every cell
    steps: Optional[int] = None         # optimizer steps of every cell
    flops: Optional[float] = None       # training FLOPs of every cell (steps from each cell's FLOPs/token)
    iso_flops: Optional[list[float]] = None  # several FLOP budgets: every cell of the grid at each

    def validate(self, path: str = "budget") -> None:
        given = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(path, f"give exactly one of {', '.join(BUDGET_KINDS)} (got {', '.join(given) or 'none'})")
        for kind in ("tokens", "steps", "flops"):
            value = getattr(self, kind)
            if value is not None and not value > 0:
                raise ConfigError(f"{path}.{kind}", f"must be > 0, got {value}")
        if self.tokens is not None and self.tokens != int(self.tokens):
            raise ConfigError(f"{path}.tokens", f"must be a whole number, got {self.tokens}")
        if self.iso_flops is not None:
            if not self.iso_flops:
                raise ConfigError(f"{path}.iso_flops", "must list at least one FLOP budget")
            for i, value in enumerate(self.iso_flops):
                if not value > 0:
                    raise ConfigError(f"{path}.iso_flops[{i}]", f"must be > 0, got {value}")
                if value in self.iso_flops[:i]:
                    raise ConfigError(f"{path}.iso_flops[{i}]", f"duplicate budget {value:g}")

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)

    def values(self) -> list[float]:
        """The budgets of the sweep (one entry unless iso_flops)."""
        return list(self.iso_flops) if self.iso_flops is not None else [getattr(self, self.kind)]


@dataclass
class LrConfig:
    """A fixed learning rate (`lr: 3e-3`) or Optuna tuning per (base, family)."""

    value: Optional[float] = None       # the fixed learning rate (without tune)
    tune: bool = False                  # choose it with Optuna per (base, family) before the grid
    trials: int = 4                     # Optuna trials per (base, family)
    range: tuple[float, float] = (1e-4, 3e-2)   # log-uniform search range
    steps: Optional[int] = None         # steps per trial; None -> a tenth of the cell's, at least 10
    metric: str = "val_loss"            # minimised; falls back to the final training loss

    def validate(self, path: str = "lr") -> None:
        if self.tune:
            if self.value is not None:
                raise ConfigError(f"{path}.value", "a tuned learning rate takes no value")
            if len(self.range) != 2:
                raise ConfigError(f"{path}.range", f"expected [low, high], got {list(self.range)}")
            low, high = self.range
            if not 0 < low < high < 1:
                raise ConfigError(f"{path}.range", f"needs 0 < low < high < 1, got [{low:g}, {high:g}]")
            if self.trials < 1:
                raise ConfigError(f"{path}.trials", f"must be >= 1, got {self.trials}")
            if self.steps is not None and self.steps < 1:
                raise ConfigError(f"{path}.steps", f"must be >= 1, got {self.steps}")
        elif self.value is None:
            raise ConfigError(path, "give a value (a fixed learning rate) or tune: true")
        elif not 0 < self.value < 1:
            raise ConfigError(f"{path}.value", f"a fixed learning rate must be in (0, 1), got {self.value}")

    def spec(self) -> Any:
        """What the cell id hashes: the number, or the tuning settings."""
        if not self.tune:
            return self.value
        return {"tune": True, "trials": self.trials, "range": list(self.range), "steps": self.steps,
                "metric": self.metric}


@dataclass
class StudyTracking:
    uri: Optional[str] = None           # None -> sqlite:///<workdir>/mlflow.db
    system_metrics: bool = True         # log each run's CPU, memory and GPU use (MLflow system metrics)


SELECTOR_KEYS: tuple[str, ...] = ("family", "base", "memory_slots", "experts", "method")  # method: finetuning cells


@dataclass
class ClaimConfig:
    """A claim the study tests after the grid (`platform/laws/claims.py`), seed by seed."""

    id: str                             # short name, e.g. recall_vs_dense
    claim: str                          # the sentence a reader checks
    metric: str                         # val_loss | qa_exact_match | qa_answer_nll (lower is better for losses)
    kind: Literal["pairwise", "trend"] = "pairwise"  # subject beats reference | subject improves with memory size
    subject: dict[str, Any] = field(default_factory=dict)    # which cells: family, base, memory_slots, experts
    reference: dict[str, Any] = field(default_factory=dict)  # pairwise: the cells they are compared with
    at_least: bool = False              # ties hold (>=) instead of strictly better

    def validate(self, path: str = "claim") -> None:
        if not self.id or not self.claim:
            raise ConfigError(path, "a claim needs an id and the sentence it claims")
        if self.metric not in CLAIM_METRICS:
            raise ConfigError(f"{path}.metric",
                              f"unknown metric {self.metric!r} (expected one of {', '.join(CLAIM_METRICS)})")
        for part in ("subject", "reference"):
            for key in getattr(self, part):
                if key not in SELECTOR_KEYS:
                    raise ConfigError(f"{path}.{part}.{key}",
                                      f"unknown key (expected one of {', '.join(SELECTOR_KEYS)})")
        if not self.subject:
            raise ConfigError(f"{path}.subject", "name the cells the claim is about (e.g. family: memory_plus)")
        if self.kind == "pairwise" and not self.reference:
            raise ConfigError(f"{path}.reference", "a pairwise claim needs the cells it compares with")


@dataclass
class FitConfig:
    enabled: bool = True                # fit the laws and check the claims after the grid
    laws: list[str] = field(default_factory=lambda: list(LAWS))  # which of LAWS to fit
    bootstrap: int = 200                # resamples for the confidence intervals (0: none)
    claims: list[ClaimConfig] = field(default_factory=list)  # checked after the grid, reported first

    def validate(self, path: str = "fit") -> None:
        ids = [c.id for c in self.claims]
        for i, claim_id in enumerate(ids):
            if claim_id in ids[:i]:
                raise ConfigError(f"{path}.claims[{i}].id", f"duplicate claim id {claim_id!r}")
        for i, law in enumerate(self.laws):
            if law not in LAWS:
                raise ConfigError(f"{path}.laws[{i}]", f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
        if self.bootstrap < 0:
            raise ConfigError(f"{path}.bootstrap", f"must be >= 0, got {self.bootstrap}")


@dataclass
class EvalConfig:
    """The evaluation stage: downstream tasks on every finished cell's final checkpoint."""

    tasks: list[str] = field(default_factory=list)  # nq_open, triviaqa, facts_qa, or lm_eval task names
    data_dir: Optional[str] = None      # holds nq_open/validation.jsonl, triviaqa/validation.jsonl (on the cluster)
    limit: Optional[int] = None         # items per task (None: all; facts_qa: the training loop's rule)
    num_fewshot: Optional[int] = None   # None: each task's default (0 for ours)
    batch_size: int = 32                # sequences per forward pass
    timeout_s: float = 7200.0           # the longest the stage waits for the next cell's scores

    def validate(self, path: str = "eval") -> None:
        if not self.tasks:
            raise ConfigError(f"{path}.tasks",
                              "name at least one task (nq_open, triviaqa, facts_qa, or an lm_eval task)")
        for i, task in enumerate(self.tasks):
            if not isinstance(task, str) or not task or "," in task:
                raise ConfigError(f"{path}.tasks[{i}]", f"expected a task name, got {task!r}")
            if task in self.tasks[:i]:
                raise ConfigError(f"{path}.tasks[{i}]", f"task {task} named twice")
            if task in ("nq_open", "triviaqa") and not self.data_dir:
                raise ConfigError(f"{path}.data_dir",
                                  f"task {task} reads its questions from data_dir/{task}/validation.jsonl")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{path}.limit", f"must be >= 1, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"{path}.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size", f"must be >= 1, got {self.batch_size}")
        if not 0 < self.timeout_s < float("inf"):
            raise ConfigError(f"{path}.timeout_s", f"must be a number of seconds > 0, got {self.timeout_s}")

    def options(self) -> dict[str, Any]:
        """The keyword options of an evaluation (eval.stage.evaluate_target)."""
        return {"data_dir": self.data_dir, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "batch_size": self.batch_size}


@dataclass
class Study:
    name: str                           # the MLflow experiment and the folder ./runs/<name>
    data: DataConfig                    # the corpus and tokenizer of every cell
    grid: GridConfig                    # bases x families x memory sizes x expert counts
    budget: BudgetConfig                # what each cell trains for
    seeds: list[int]                    # every grid point is trained once per seed
    lr: LrConfig                        # fixed or tuned learning rate
    train: TrainConfig                  # defaults; the budget, seed and lr are set per cell
    resources: ResourcesConfig          # per cell: workers, CPUs/GPUs, memory parallelism, runner
    tracking: StudyTracking             # the MLflow store of the study
    fit: FitConfig                      # laws and claims after the grid
    workdir: Optional[str] = None       # None -> ./runs/<name>
    storage: Optional[str] = None       # s3://bucket/prefix, gs://..., or a shared path; files go to <storage>/<name>/
    description: str = ""               # free text about the study
    report: bool = True                 # write the HTML report after the grid
    eval: Optional[EvalConfig] = None   # downstream tasks after each cell (None: no evaluation stage)
    finetune: Optional[FinetuneConfig] = None  # a finetuning study: cells start from source checkpoints
    file: Optional[Path] = None         # the YAML it came from

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    def workdir_path(self) -> Path:
        return Path(self.workdir).resolve() if self.workdir else default_workdir(self.name)

    def tracking_uri(self) -> str:
        return self.tracking.uri or sqlite_uri(self.workdir_path())

    def storage_root(self) -> str:
        """The study's one folder for durable files: `<storage>/<name>`, or its workdir without storage."""
        return study_folder(self.storage, self.name, self.workdir_path())

    def family_grid(self, family: str) -> FamilyGrid:
        """The grid of one family with its overrides applied."""
        g, o = self.grid, self.grid.overrides.get(family, FamilyGrid())
        return FamilyGrid(
            bases=o.bases if o.bases is not None else g.bases,
            memory_sizes=(o.memory_sizes if o.memory_sizes is not None else g.memory_sizes)
            if family in MEMORY_FAMILIES else [None],
            experts=(o.experts if o.experts is not None else g.experts) if family == "moe" else [None],
            memory={**g.memory, **o.memory}, moe={**g.moe, **o.moe}, model={**g.model, **o.model},
            resources={**to_dict(self.resources), **o.resources}, lr=o.lr)


TOP_KEYS: tuple[str, ...] = ("name", "description", "data", "tokenizer", "seq_len", "grid", "budget", "seeds",
                             "lr", "train", "resources", "tracking", "fit", "report", "workdir",
                             "storage", "eval", "finetune")

