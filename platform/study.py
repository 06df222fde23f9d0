"""A study: its YAML schema, validation that reports every problem, and expansion into cells.

A study file names the data, the grid (bases x families x memory sizes | expert counts, with
per-family overrides), the budget of each cell (tokens, steps, training FLOPs or an iso-FLOP
sweep), seeds, the learning rate (fixed or tuned), training defaults, resources per run, tracking
and fit settings. `load_study(path)` reads it with a safe YAML loader and validates everything
before anything starts: all problems are collected and raised together as `StudyError`, one line
each, starting with the field's path (`grid.families[2]: unknown family 'mem+' (...)`).

`expand(study)` turns the study into `Cell`s: one per grid point x budget x seed. A cell holds
everything its run needs; `cell.id` is a short hash of that content (stable across runs and
machines), which is how the controller recognises finished work. FLOP budgets are turned into
steps with the model accounting, so the cells of one budget are FLOP-matched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import yaml

from memlayers.models.accounting import account
from memlayers.models.config import FAMILIES, MEMORY_FAMILIES, MemoryConfig, ModelConfig, MoEConfig
from memlayers.models.presets import BASES, MEMORY_SIZES, memory_size_name
from memlayers.models.schema import ConfigError, from_dict, join, to_dict
from memlayers.platform.data.config import TOKENIZERS, DataConfig
from memlayers.platform.run_config import ModelSpec, ResourcesConfig, RunConfig, TrackingConfig, TrainConfig
from memlayers.platform.study_ref import default_workdir, sqlite_uri

LAWS: tuple[str, ...] = ("compute", "memory", "recall")  # sections of laws.study.fit_study
BUDGET_KINDS: tuple[str, ...] = ("tokens", "steps", "flops", "iso_flops")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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

    bases: Optional[list[str]] = None
    memory_sizes: Optional[list[Any]] = None
    experts: Optional[list[int]] = None
    memory: dict[str, Any] = field(default_factory=dict)     # MemoryConfig options
    moe: dict[str, Any] = field(default_factory=dict)        # MoEConfig options
    model: dict[str, Any] = field(default_factory=dict)      # ModelConfig overrides
    resources: dict[str, Any] = field(default_factory=dict)  # ResourcesConfig overrides


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

    tokens: Optional[float] = None
    steps: Optional[int] = None
    flops: Optional[float] = None
    iso_flops: Optional[list[float]] = None

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

    value: Optional[float] = None
    tune: bool = False
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
    system_metrics: bool = True


@dataclass
class FitConfig:
    enabled: bool = True
    laws: list[str] = field(default_factory=lambda: list(LAWS))
    bootstrap: int = 200                # resamples for the confidence intervals (0: none)

    def validate(self, path: str = "fit") -> None:
        for i, law in enumerate(self.laws):
            if law not in LAWS:
                raise ConfigError(f"{path}.laws[{i}]", f"unknown law {law!r} (expected one of {', '.join(LAWS)})")
        if self.bootstrap < 0:
            raise ConfigError(f"{path}.bootstrap", f"must be >= 0, got {self.bootstrap}")


@dataclass
class Study:
    name: str
    data: DataConfig
    grid: GridConfig
    budget: BudgetConfig
    seeds: list[int]
    lr: LrConfig
    train: TrainConfig                  # defaults; the budget, seed and lr are set per cell
    resources: ResourcesConfig
    tracking: StudyTracking
    fit: FitConfig
    workdir: Optional[str] = None       # None -> ./runs/<name>
    description: str = ""
    report: bool = True                 # write the HTML report after the grid
    file: Optional[Path] = None         # the YAML it came from

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    def workdir_path(self) -> Path:
        return Path(self.workdir).resolve() if self.workdir else default_workdir(self.name)

    def tracking_uri(self) -> str:
        return self.tracking.uri or sqlite_uri(self.workdir_path())

    def family_grid(self, family: str) -> FamilyGrid:
        """The grid of one family with its overrides applied."""
        g, o = self.grid, self.grid.overrides.get(family, FamilyGrid())
        return FamilyGrid(
            bases=o.bases if o.bases is not None else g.bases,
            memory_sizes=(o.memory_sizes if o.memory_sizes is not None else g.memory_sizes)
            if family in MEMORY_FAMILIES else [None],
            experts=(o.experts if o.experts is not None else g.experts) if family == "moe" else [None],
            memory={**g.memory, **o.memory}, moe={**g.moe, **o.moe}, model={**g.model, **o.model},
            resources={**to_dict(self.resources), **o.resources})


TOP_KEYS: tuple[str, ...] = ("name", "description", "data", "tokenizer", "seq_len", "grid", "budget", "seeds",
                             "lr", "train", "resources", "tracking", "fit", "report", "workdir")


# ---- loading and validation -----------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e12 as a number (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML hook
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raises StudyError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise StudyError([ConfigError(str(path), "study file not found")])
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise StudyError([ConfigError(where, f"invalid YAML: {problem}")]) from None
    return study_from_dict(data, file=path.resolve())


def study_from_dict(data: Any, file: Path | None = None) -> Study:
    """Validate a mapping into a Study; raises StudyError listing every problem."""
    if not isinstance(data, dict):
        raise StudyError([ConfigError("study", f"expected a mapping of {', '.join(TOP_KEYS)}, got {type(data).__name__}")])
    errors: list[ConfigError] = []
    for key in data:
        if key not in TOP_KEYS:
            errors.append(ConfigError(str(key), f"unknown key (expected one of {', '.join(TOP_KEYS)})"))
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(ConfigError("name", f"a study needs a name of letters, digits, '_', '.', '-', got {name!r}"))
    description = data.get("description") or ""
    if not isinstance(description, str):
        errors.append(ConfigError("description", f"expected a string, got {description!r}"))
    workdir = data.get("workdir")
    if workdir is not None and not isinstance(workdir, str):
        errors.append(ConfigError("workdir", f"expected a path, got {workdir!r}"))
    report = data.get("report", True)
    if not isinstance(report, bool):
        errors.append(ConfigError("report", f"expected true or false, got {report!r}"))
    data_cfg = _data_section(data, errors)
    grid = _grid_section(data.get("grid"), errors)
    budget = _section(BudgetConfig, data.get("budget"), "budget", errors)
    seeds = _seeds(data.get("seeds", [0]), errors)
    train, lr = _train_and_lr(data.get("train"), data.get("lr"), errors)
    resources = _section(ResourcesConfig, data.get("resources"), "resources", errors)
    tracking = _section(StudyTracking, data.get("tracking"), "tracking", errors)
    fit = _section(FitConfig, data.get("fit"), "fit", errors)
    study = Study(name=name, description=description, data=data_cfg or DataConfig(), grid=grid, budget=budget,
                  seeds=seeds, lr=lr, train=train, resources=resources or ResourcesConfig(), tracking=tracking, fit=fit,
                  workdir=workdir, report=report, file=file)
    if grid is not None:
        _check_grid(study, errors)
    if not errors:
        _check_models(study, errors)
    if errors:
        raise StudyError(errors)
    return study


def _section(cls: type, data: Any, path: str, errors: list[ConfigError], fixed: dict | None = None) -> Any:
    """from_dict(cls, data) collecting every unknown key and every bad field instead of the first."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(ConfigError(path, f"expected a mapping, got {data!r} ({type(data).__name__})"))
        return None
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    clean = {}
    for key, value in data.items():
        if key in known:
            clean[key] = value
        else:
            errors.append(ConfigError(join(path, str(key)), f"unknown key (expected one of {', '.join(sorted(known))})"))
    before = len(errors)
    while True:
        try:
            obj = from_dict(cls, {**clean, **(fixed or {})}, path)
            return obj if len(errors) == before else None
        except ConfigError as error:
            key = re.split(r"[.\[]", error.path[len(path) + 1:] if path else error.path)[0]
            if key not in clean:  # a section-level problem: report it unless it follows from a dropped field
                if len(errors) == before:
                    errors.append(error)
                return None
            errors.append(error)
            del clean[key]  # drop the offending field and look for further problems


def _data_section(data: dict, errors: list[ConfigError]) -> Optional[DataConfig]:
    section = data.get("data")
    section = dict(section) if isinstance(section, dict) else section
    for key in ("tokenizer", "seq_len"):
        if key not in data:
            continue
        value = data[key]
        if key == "tokenizer" and value not in TOKENIZERS:
            errors.append(ConfigError(key, f"unknown tokenizer {value!r} (expected one of {', '.join(TOKENIZERS)})"))
        elif key == "seq_len" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            errors.append(ConfigError(key, f"must be a positive integer, got {value!r}"))
        elif isinstance(section, dict) and key in section and section[key] != value:
            errors.append(ConfigError(key, f"given twice: {value!r} here and {section[key]!r} in data.{key}"))
        elif isinstance(section, dict) or section is None:
            section = {**(section or {}), key: value}
    return _section(DataConfig, section, "data", errors)


def _grid_section(data: Any, errors: list[ConfigError]) -> Optional[GridConfig]:
    if not isinstance(data, dict):
        errors.append(ConfigError("grid", f"expected a mapping with bases and families, got {data!r}"))
        return None
    overrides = data.get("overrides") or {}
    grid = _section(GridConfig, {k: v for k, v in data.items() if k != "overrides"}, "grid", errors)
    if not isinstance(overrides, dict):
        errors.append(ConfigError("grid.overrides", f"expected a mapping of family -> settings, got {overrides!r}"))
        return None
    parsed = {}
    for family, section in overrides.items():
        override = _section(FamilyGrid, section, f"grid.overrides.{family}", errors)
        if override is not None:
            parsed[family] = override
    if grid is not None:
        grid.overrides = parsed
    return grid


def _seeds(data: Any, errors: list[ConfigError]) -> list[int]:
    if isinstance(data, int) and not isinstance(data, bool):
        data = [data]
    if not isinstance(data, list) or not data:
        errors.append(ConfigError("seeds", f"expected a non-empty list of integers, got {data!r}"))
        return []
    for i, seed in enumerate(data):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            errors.append(ConfigError(f"seeds[{i}]", f"expected an integer >= 0, got {seed!r}"))
        elif seed in data[:i]:
            errors.append(ConfigError(f"seeds[{i}]", f"duplicate seed {seed}"))
    return list(data)


def _train_and_lr(train: Any, lr: Any, errors: list[ConfigError]) -> tuple[Optional[TrainConfig], Optional[LrConfig]]:
    train = dict(train) if isinstance(train, dict) else train
    if isinstance(train, dict):
        for key in ("steps", "tokens", "flops"):
            if key in train:
                errors.append(ConfigError(f"train.{key}", "the budget belongs in the budget section, not train"))
                del train[key]
        if "seed" in train:
            errors.append(ConfigError("train.seed", "seeds come from the top-level seeds list"))
            del train["seed"]
        if "lr" in train and lr is not None:
            errors.append(ConfigError("train.lr", "the learning rate is given twice (train.lr and lr)"))
    train_cfg = _section(TrainConfig, train, "train", errors, fixed={"steps": 1})
    if lr is None:
        lr_cfg = LrConfig(value=train_cfg.lr if train_cfg else TrainConfig.lr)
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        lr_cfg = _section(LrConfig, {"value": lr}, "lr", errors)
    elif lr == "tune":
        lr_cfg = LrConfig(tune=True)
    elif not isinstance(lr, dict):
        errors.append(ConfigError("lr", f"expected a number, 'tune' or a mapping (value | tune, trials, range, "
                                        f"steps, metric), got {lr!r}"))
        lr_cfg = None
    else:
        lr_cfg = _section(LrConfig, lr, "lr", errors)
    return train_cfg, lr_cfg


def _check_grid(study: Study, errors: list[ConfigError]) -> None:
    grid = study.grid
    if not grid.families:
        errors.append(ConfigError("grid.families", "empty grid: list at least one family"))
    _check_names(grid.families, FAMILIES, "grid.families", "family", errors)
    for family in grid.overrides:
        if family not in grid.families:
            errors.append(ConfigError(f"grid.overrides.{family}", f"family {family!r} is not in grid.families"))
    _check_lists(grid, "grid", errors)
    for family, override in grid.overrides.items():
        _check_lists(override, f"grid.overrides.{family}", errors)
    for family in dict.fromkeys(grid.families):
        if family not in FAMILIES:
            continue
        fg, own = study.family_grid(family), grid.overrides.get(family, FamilyGrid())
        where = (lambda key: f"grid.overrides.{family}.{key}" if getattr(own, key) is not None else f"grid.{key}")
        if not fg.bases:
            errors.append(ConfigError(where("bases"), f"family {family!r} needs at least one base"))
        if family in MEMORY_FAMILIES and not fg.memory_sizes:
            errors.append(ConfigError(where("memory_sizes"), f"family {family!r} needs at least one memory size"))
        if family == "moe" and not fg.experts:
            errors.append(ConfigError(where("experts"), "family 'moe' needs at least one expert count"))
        path = f"grid.overrides.{family}.resources" if own.resources else "resources"
        try:
            resources = from_dict(ResourcesConfig, fg.resources, path)
            if resources.memory_parallel > 1 and family not in MEMORY_FAMILIES:
                errors.append(ConfigError(f"{path}.memory_parallel", f"{resources.memory_parallel} needs a memory "
                                          f"family; {family} cells would get it (set it under grid.overrides)"))
        except ConfigError as error:
            errors.append(error)


def _check_names(values: list, known: tuple, path: str, what: str, errors: list[ConfigError]) -> None:
    for i, value in enumerate(values):
        if value not in known:
            errors.append(ConfigError(f"{path}[{i}]", f"unknown {what} {value!r} (expected one of {', '.join(known)})"))
        elif value in values[:i]:
            errors.append(ConfigError(f"{path}[{i}]", f"duplicate {what} {value!r}"))


def _check_lists(grid: GridConfig | FamilyGrid, path: str, errors: list[ConfigError]) -> None:
    _check_names(grid.bases or [], tuple(BASES), f"{path}.bases", "base", errors)
    slots: list[int] = []
    for i, size in enumerate(grid.memory_sizes or []):
        n = parse_memory_size(size)
        if n is None:
            errors.append(ConfigError(f"{path}.memory_sizes[{i}]", f"unknown memory size {size!r} (expected one of "
                                      f"{', '.join(MEMORY_SIZES)} or a square number of slots n*n)"))
        elif n in slots:
            errors.append(ConfigError(f"{path}.memory_sizes[{i}]", f"duplicate memory size {size!r}"))
        slots.append(n)
    for i, experts in enumerate(grid.experts or []):
        if experts < 1:
            errors.append(ConfigError(f"{path}.experts[{i}]", f"must be >= 1, got {experts}"))
        elif experts in grid.experts[:i]:
            errors.append(ConfigError(f"{path}.experts[{i}]", f"duplicate expert count {experts}"))
    for key, cls in (("memory", MemoryConfig), ("moe", MoEConfig), ("model", ModelConfig)):
        known = {f.name for f in dataclasses.fields(cls)} - ({"slots"} if cls is MemoryConfig else
                                                            {"experts"} if cls is MoEConfig else {"family", "memory", "moe"})
        for name in getattr(grid, key):
            if name not in known:
                errors.append(ConfigError(f"{path}.{key}.{name}", f"unknown key (expected one of {', '.join(sorted(known))})"))


def parse_memory_size(size: Any) -> Optional[int]:
    """'1m' -> 1048576, 4096 -> 4096; None if not a known name or not a positive square."""
    if isinstance(size, str):
        return MEMORY_SIZES.get(size)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0 and math.isqrt(size) ** 2 == size:
        return size
    return None


def _check_models(study: Study, errors: list[ConfigError]) -> None:
    """Build every grid point's model; each problem is reported once, at the key it came from,
    with the grid points it affects."""
    found: dict[tuple[str, str], list[str]] = {}
    for family, base, slots, experts, fg in _grid_points(study):
        try:
            _model_spec(family, base, slots, experts, fg).build(vocab_size=256, seq_len=study.seq_len)
        except ConfigError as error:
            found.setdefault(_grid_path(study, family, error), []).append(f"{family} on {base}")
    for (path, reason), where in found.items():
        errors.append(ConfigError(path, f"{reason} ({', '.join(dict.fromkeys(where))})"))


def _grid_path(study: Study, family: str, error: ConfigError) -> tuple[str, str]:
    """(study path, reason) of a model-building error: the grid key that set the bad option."""
    parts = error.path.split(".")
    section = parts[1] if len(parts) > 2 and parts[1] in ("memory", "moe") else "model"
    leaf = parts[-1]
    override = study.grid.overrides.get(family, FamilyGrid())
    for where, options in ((f"grid.overrides.{family}", getattr(override, section)), ("grid", getattr(study.grid, section))):
        if leaf in options:
            return f"{where}.{section}.{leaf}", error.reason
    for where, options in ((f"grid.overrides.{family}", getattr(override, section)), ("grid", getattr(study.grid, section))):
        if options:  # a derived field broke: blame the options that were given
            return f"{where}.{section}", f"{error.path}: {error.reason}"
    return error.path, error.reason


# ---- expansion ------------------------------------------------------------------------------

def _grid_points(study: Study):
    for family in study.grid.families:
        fg = study.family_grid(family)
        for base in fg.bases:
            for size in fg.memory_sizes:
                for experts in fg.experts:
                    yield family, base, parse_memory_size(size) if size is not None else None, experts, fg


def _model_spec(family: str, base: str, slots: int | None, experts: int | None, fg: FamilyGrid) -> ModelSpec:
    return ModelSpec(base=base, family=family, memory_slots=slots, experts=experts,
                     memory=dict(fg.memory) if family in MEMORY_FAMILIES else {},
                     moe=dict(fg.moe) if family == "moe" else {}, overrides=dict(fg.model))


@dataclass
class Cell:
    """One grid point x budget x seed: everything its training run needs."""

    id: str
    name: str                           # the MLflow run name, e.g. memory_plus-nano-4k-seed0
    study: str
    family: str
    base: str
    memory_slots: Optional[int]
    experts: Optional[int]
    seed: int
    lr: Union[float, str]               # a number or "tuned"
    model: ModelSpec
    data: DataConfig
    train: TrainConfig                  # budget as steps once accounted
    resources: ResourcesConfig
    budget: dict[str, Any]              # {"kind": tokens|steps|flops|iso_flops, "value": ...}
    tokens: Optional[int] = None        # planned training tokens
    steps: Optional[int] = None
    flops_per_token: Optional[int] = None   # training FLOPs per token (3 x forward)
    params: Optional[int] = None
    active_params: Optional[int] = None
    train_flops: Optional[float] = None     # planned total training FLOPs

    @property
    def variant(self) -> str:
        if self.memory_slots is not None:
            return memory_size_name(self.memory_slots)
        return f"{self.experts}x" if self.experts is not None else ""

    def tags(self, role: str = "cell") -> dict[str, str]:
        tags = {"memlayers.role": role, "study": self.study, "seed": str(self.seed)}
        if role == "cell":
            tags.update(cell=self.id, budget_kind=self.budget["kind"], budget=f"{self.budget['value']:g}")
        return tags

    def run_config(self, *, workdir: Path, tracking_uri: str, parent_run_id: str | None = None,
                   run_id: str | None = None, lr: float | None = None, steps: int | None = None,
                   role: str = "cell", run_name: str | None = None, system_metrics: bool = True) -> RunConfig:
        """The RunConfig of this cell (or of a tuning trial of it: role='tuning', steps, lr)."""
        if lr is None and self.lr == "tuned":
            raise ValueError(f"cell {self.name}: its learning rate is tuned; pass lr=")
        if self.steps is None and steps is None:
            raise ValueError(f"cell {self.name}: not accounted yet (expand with a vocabulary size)")
        train = dataclasses.replace(self.train, steps=steps or self.steps, tokens=None, flops=None, seed=self.seed,
                                    lr=lr if lr is not None else self.lr)
        name = run_name or self.name
        tracking = TrackingConfig(uri=tracking_uri, experiment=self.study, run_name=name, parent_run_id=parent_run_id,
                                  run_id=run_id, tags=self.tags(role), system_metrics=system_metrics)
        cfg = RunConfig(name=name, model=self.model, data=self.data, train=train, resources=self.resources,
                        tracking=tracking, workdir=str(workdir / "cells" / f"{self.name}-{self.id}" if role == "cell" else workdir / role / name))
        train.validate("train")
        cfg.validate()
        return cfg


def expand(study: Study, *, vocab_size: int | None = None, account_budgets: bool = True,
           cache_dir: Path | None = None) -> list[Cell]:
    """Every cell of the study, in grid order. With `account_budgets` (the default) each cell's
    tokens, steps and FLOPs are computed for the tokenizer's vocabulary (`vocab_size`, found
    with `study_vocab_size` when not given); raises StudyError if a budget gives no step."""
    cells = []
    for family, base, slots, experts, fg in _grid_points(study):
        spec = _model_spec(family, base, slots, experts, fg)
        resources = from_dict(ResourcesConfig, fg.resources, "resources")
        for budget in study.budget.values():
            for seed in study.seeds:
                content = {"model": to_dict(spec), "data": to_dict(study.data), "seed": seed, "lr": study.lr.spec(),
                           "train": {k: v for k, v in to_dict(study.train).items()
                                     if k not in ("steps", "tokens", "flops", "seed", "lr")},
                           "budget": {"kind": study.budget.kind, "value": budget}}
                digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]
                parts = [family, base, memory_size_name(slots) if slots else f"{experts}x" if experts else None,
                         f"{budget:.3g}".replace("e+", "e") + "F" if study.budget.kind == "iso_flops" else None,
                         f"seed{seed}"]
                cells.append(Cell(id=digest, name="-".join(p for p in parts if p), study=study.name, family=family,
                                  base=base, memory_slots=slots, experts=experts, seed=seed,
                                  lr="tuned" if study.lr.tune else study.lr.value, model=spec, data=study.data,
                                  train=study.train, resources=resources,
                                  budget={"kind": study.budget.kind, "value": budget}))
    if account_budgets:
        vocab = vocab_size or study_vocab_size(study, cache_dir)
        short: dict[float, list[Cell]] = {}
        for cell in cells:
            if not _account(cell, vocab, study.seq_len):
                short.setdefault(cell.budget["value"], []).append(cell)
        if short:
            path = "budget.flops" if study.budget.kind == "flops" else "budget.iso_flops"
            raise StudyError([ConfigError(path, f"{value:g} FLOPs buy no step of {', '.join(c.name for c in poor)} "
                                                f"(one step costs {_step_flops(poor[0], vocab, study.seq_len):.3g})")
                              for value, poor in short.items()])
    return cells


def _step_flops(cell: Cell, vocab_size: int, seq_len: int) -> float:
    acc = account(cell.model.build(vocab_size, seq_len), seq_len)
    return float(acc.train_flops_per_token * cell.train.batch_size * seq_len)


def _account(cell: Cell, vocab_size: int, seq_len: int) -> bool:
    """Fill the cell's accounting; False if its budget does not buy one step."""
    acc = account(cell.model.build(vocab_size, seq_len), seq_len)
    per_step = cell.train.batch_size * seq_len
    kind, value = cell.budget["kind"], cell.budget["value"]
    tokens = value * per_step if kind == "steps" else value if kind == "tokens" else value / acc.train_flops_per_token
    steps = int(tokens // per_step) if kind in ("flops", "iso_flops") else max(1, round(tokens / per_step))
    if steps < 1:
        return False
    cell.steps, cell.tokens = steps, steps * per_step
    cell.flops_per_token, cell.params, cell.active_params = acc.train_flops_per_token, acc.total_params, acc.active_params
    cell.train_flops = float(cell.tokens * acc.train_flops_per_token)
    return True


def study_vocab_size(study: Study, cache_dir: Path | None = None) -> int:
    """The vocabulary the study's tokenizer will have: byte -> 258, bpe -> data.vocab_size, word ->
    built from the corpus (prepared into `cache_dir`, or a temporary directory that is removed)."""
    from memlayers.platform.data.tokenizers import ByteTokenizer

    if study.data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if study.data.tokenizer == "bpe":
        return study.data.vocab_size
    return _prepared_vocab(study.data, cache_dir)


def _prepared_vocab(data: DataConfig, cache_dir: Path | None) -> int:
    from memlayers.platform.data.prepare import prepare_data

    if cache_dir is not None:
        return prepare_data(data, Path(cache_dir)).tokenizer.vocab_size
    with tempfile.TemporaryDirectory(prefix="memlayers-vocab-") as tmp:
        return prepare_data(data, Path(tmp)).tokenizer.vocab_size


def cells_by(cells: list[Cell], key: Callable[[Cell], Any]) -> dict[Any, list[Cell]]:
    """Group cells, keeping grid order: e.g. by (base, family) for learning-rate tuning."""
    groups: dict[Any, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(key(cell), []).append(cell)
    return groups
