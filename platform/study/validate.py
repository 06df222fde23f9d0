"""Reading and validating a study file: every problem collected, one line each, naming its field.

`load_study(path)` reads the file with the one YAML reader (`memlayers.config_schema.read_yaml`)
and validates everything before anything starts: all problems are raised together as
`StudyError` (`grid.families[2]: unknown family 'mem+' (...)`). Every size a study can name is
bounded (see `limits.py`), so validation of any file answers within seconds.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from memlayers.config_schema import ConfigError, from_dict, join, name_problem, read_yaml
from memlayers.models.config import (
    FAMILIES,
    MEMORY_FAMILIES,
    MEMORY_PARALLEL_FAMILIES,
    MemoryConfig,
    ModelConfig,
    MoEConfig,
)
from memlayers.models.presets import BASES, MEMORY_SIZES
from memlayers.platform.cluster.storage import uri_problem
from memlayers.platform.data.config import TOKENIZERS, DataConfig
from memlayers.platform.finetune.config import FinetuneConfig
from memlayers.platform.study.cells import grid_points, model_spec, parse_memory_size
from memlayers.platform.study.schema import (
    TOP_KEYS,
    BudgetConfig,
    EvalConfig,
    FamilyGrid,
    FitConfig,
    GridConfig,
    LrConfig,
    Study,
    StudyError,
    StudyTracking,
)
from memlayers.platform.train.run_config import MAX_SEED, ResourcesConfig, TrainConfig


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raises StudyError listing every problem."""
    try:
        data = read_yaml(path)
    except ConfigError as error:
        raise StudyError([error]) from None
    return study_from_dict(data, file=Path(path).resolve())


def study_from_dict(data: Any, file: Path | None = None) -> Study:
    """Validate a mapping into a Study; raises StudyError listing every problem."""
    if not isinstance(data, dict):
        raise StudyError([ConfigError("study", f"expected a mapping of {', '.join(TOP_KEYS)}, "
                                               f"got {type(data).__name__}")])
    errors: list[ConfigError] = []
    for key in data:
        if key not in TOP_KEYS:
            errors.append(ConfigError(str(key), f"unknown key (expected one of {', '.join(TOP_KEYS)})"))
    name = data.get("name")
    if name is None:
        errors.append(ConfigError("name", "a study needs a name of letters, digits, '_', '.', '-'"))
    elif name_problem(name):
        errors.append(ConfigError("name", name_problem(name)))
    description = data.get("description") or ""
    if not isinstance(description, str):
        errors.append(ConfigError("description", f"expected a string, got {description!r}"))
    workdir = data.get("workdir")
    if workdir is not None and not isinstance(workdir, str):
        errors.append(ConfigError("workdir", f"expected a path, got {workdir!r}"))
    storage = data.get("storage")
    if storage is not None and uri_problem(storage):
        errors.append(ConfigError("storage", uri_problem(storage)))
    report = data.get("report", True)
    if not isinstance(report, bool):
        errors.append(ConfigError("report", f"expected true or false, got {report!r}"))
    data_cfg = _data_section(data, errors)
    finetune = (_section(FinetuneConfig, data["finetune"], "finetune", errors)
                if data.get("finetune") is not None else None)
    # a finetuning study's cells come from its sources: it has no grid of its own
    grid = GridConfig() if "finetune" in data and "grid" not in data else _grid_section(data.get("grid"), errors)
    budget = _section(BudgetConfig, data.get("budget"), "budget", errors)
    seeds = _seeds(data.get("seeds", [0]), errors)
    train, lr = _train_and_lr(data.get("train"), data.get("lr"), errors)
    resources = _section(ResourcesConfig, data.get("resources"), "resources", errors)
    tracking = _section(StudyTracking, data.get("tracking"), "tracking", errors)
    fit = _section(FitConfig, data.get("fit"), "fit", errors)
    eval_cfg = _section(EvalConfig, data["eval"], "eval", errors) if data.get("eval") is not None else None
    study = Study(name=name, description=description, data=data_cfg or DataConfig(), grid=grid, budget=budget,
                  seeds=seeds, lr=lr, train=train, resources=resources or ResourcesConfig(), tracking=tracking, fit=fit,
                  workdir=workdir, storage=storage, report=report, eval=eval_cfg, finetune=finetune, file=file)
    if grid is not None and data.get("finetune") is None:
        _check_grid(study, errors)
    # finetuning cells: known once sources resolve
    if grid is not None and fit is not None and data.get("finetune") is None:
        _check_claims(study, errors)
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
            errors.append(ConfigError(join(path, str(key)),
                                      f"unknown key (expected one of {', '.join(sorted(known))})"))
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
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            errors.append(ConfigError(f"seeds[{i}]", f"expected an integer in [0, 2^63 - 1], got {seed!r}"))
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

        def where(key: str, family: str = family, own: FamilyGrid = own) -> str:
            return f"grid.overrides.{family}.{key}" if getattr(own, key) is not None else f"grid.{key}"

        if not fg.bases:
            errors.append(ConfigError(where("bases"), f"family {family!r} needs at least one base"))
        if family in MEMORY_FAMILIES and not fg.memory_sizes:
            errors.append(ConfigError(where("memory_sizes"), f"family {family!r} needs at least one memory size"))
        if family == "moe" and not fg.experts:
            errors.append(ConfigError(where("experts"), "family 'moe' needs at least one expert count"))
        if own.lr is not None:
            _check_family_lr(own.lr, fg.bases or [], study, f"grid.overrides.{family}.lr", errors)
        path = f"grid.overrides.{family}.resources" if own.resources else "resources"
        try:
            resources = from_dict(ResourcesConfig, fg.resources, path)
            if resources.memory_parallel > 1 and family not in MEMORY_PARALLEL_FAMILIES:
                errors.append(ConfigError(f"{path}.memory_parallel", f"{resources.memory_parallel} needs a family "
                                          f"with column-sharded tables ({', '.join(MEMORY_PARALLEL_FAMILIES)}); "
                                          f"{family} cells would get it (set it under grid.overrides)"))
        except ConfigError as error:
            errors.append(error)


def _check_claims(study: Study, errors: list[ConfigError]) -> None:
    """Every claim's selectors pick at least one cell of the grid: a typo would otherwise validate and
    the claim be reported as untestable only after the whole grid ran."""
    points = [{"family": family, "base": base, "memory_slots": slots or 0, "experts": experts or 0}
              for family, base, slots, experts, _ in grid_points(study)]
    for i, claim in enumerate(study.fit.claims):
        for part in ("subject", "reference"):
            selector = getattr(claim, part)
            if selector and not any(all(p.get(k) == v for k, v in selector.items()) for p in points):
                named = isinstance(selector.get("memory_slots"), str)
                hint = " (memory_slots counts slots, e.g. 4096)" if named else ""
                errors.append(ConfigError(f"fit.claims[{i}].{part}", f"{selector} matches no cell of the grid{hint}"))


def _check_family_lr(lr: Any, bases: list[str], study: Study, path: str, errors: list[ConfigError]) -> None:
    """A number, or a mapping of some of the family's bases to numbers; never beside lr.tune."""
    if study.lr.tune:
        errors.append(ConfigError(path, "a family's fixed learning rate cannot be combined with lr.tune "
                                        "(tuning already chooses one per base and family)"))
        return
    for where, value in (lr.items() if isinstance(lr, dict) else [(None, lr)]):
        at = path if where is None else f"{path}.{where}"
        if where is not None and where not in bases:
            errors.append(ConfigError(at, f"{where!r} is not one of this family's bases ({', '.join(bases)})"))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            errors.append(ConfigError(at, f"a fixed learning rate must be a number in (0, 1), got {value!r}"))


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
                                                            {"experts"} if cls is MoEConfig else
                                                            {"family", "memory", "moe"})
        for name in getattr(grid, key):
            if name not in known:
                errors.append(ConfigError(f"{path}.{key}.{name}",
                                          f"unknown key (expected one of {', '.join(sorted(known))})"))


def _check_models(study: Study, errors: list[ConfigError]) -> None:
    """Build every grid point's model; each problem is reported once, at the key it came from,
    with the grid points it affects."""
    found: dict[tuple[str, str], list[str]] = {}
    for family, base, slots, experts, fg in grid_points(study):
        try:
            model_spec(family, base, slots, experts, fg).build(vocab_size=256, seq_len=study.seq_len)
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
    for where, options in ((f"grid.overrides.{family}", getattr(override, section)),
                           ("grid", getattr(study.grid, section))):
        if leaf in options:
            return f"{where}.{section}.{leaf}", error.reason
    for where, options in ((f"grid.overrides.{family}", getattr(override, section)),
                           ("grid", getattr(study.grid, section))):
        if options:  # a derived field broke: blame the options that were given
            return f"{where}.{section}", f"{error.path}: {error.reason}"
    return error.path, error.reason


def with_overrides(study: Study, *, storage: str | None = None, tracking_uri: str | None = None,
                   seeds: list[int] | None = None) -> Study:
    """The study with the command line's `--storage` / `--tracking-uri` / `--seeds`; StudyError naming
    the field. Other seeds make another study, `<name>-seeds3-4-5` (its own MLflow experiment, work
    folder and report), so that its claims are checked on those seeds alone."""
    if storage is not None and uri_problem(storage):
        raise StudyError([ConfigError("storage", f"(--storage) {uri_problem(storage)}")])
    if tracking_uri is not None and not tracking_uri.strip():
        raise StudyError([ConfigError("tracking.uri", "(--tracking-uri) must not be empty")])
    name = study.name
    if seeds is not None:
        errors: list[ConfigError] = []
        seeds = _seeds(seeds, errors)
        if errors:
            raise StudyError([ConfigError(e.path, f"(--seeds) {e.reason}") for e in errors])
        name = f"{study.name}-seeds{'-'.join(map(str, seeds))}"
        if name_problem(name):
            raise StudyError([ConfigError("seeds", f"(--seeds) the study they make cannot be named: "
                                                   f"{name_problem(name)}")])
    tracking = dataclasses.replace(study.tracking, uri=tracking_uri) if tracking_uri else study.tracking
    return dataclasses.replace(study, name=name, seeds=seeds or study.seeds, storage=storage or study.storage,
                               tracking=tracking)
