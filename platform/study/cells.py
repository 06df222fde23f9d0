"""A study's cells: one per grid point x budget x seed, each holding everything its run needs.

`expand(study)` turns the study into `Cell`s; `cell.id` is a short hash of the cell's content
(stable across runs and machines), which is how the controller recognises finished work. Budgets
become steps through the one budget rule (`train/budget.py`) and the model accounting, so the
cells of one FLOP budget are FLOP-matched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from memlayers.config_schema import ConfigError, from_dict, to_dict
from memlayers.models.accounting import account
from memlayers.models.config import MEMORY_FAMILIES
from memlayers.models.presets import MEMORY_SIZES, memory_size_name
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.vocab import vocab_size_of
from memlayers.platform.finetune.config import FinetuneRun
from memlayers.platform.study.schema import FamilyGrid, Study, StudyError
from memlayers.platform.tracking.conventions import cell_run_name, run_tags
from memlayers.platform.train.budget import budget_steps
from memlayers.platform.train.run_config import ModelSpec, ResourcesConfig, RunConfig, TrackingConfig, TrainConfig

MAX_SLOTS = 2**32  # 65536^2, far above the paper's largest memory (4096^2 = 16m)


def parse_memory_size(size: Any) -> Optional[int]:
    """'1m' -> 1048576, 4096 -> 4096; None if not a known name or not a square in (0, MAX_SLOTS]."""
    if isinstance(size, str):
        return MEMORY_SIZES.get(size)
    if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= MAX_SLOTS and math.isqrt(size) ** 2 == size:
        return size
    return None


def grid_points(study: Study):
    for family in study.grid.families:
        fg = study.family_grid(family)
        for base in fg.bases:
            for size in fg.memory_sizes:
                for experts in fg.experts:
                    yield family, base, parse_memory_size(size) if size is not None else None, experts, fg


def model_spec(family: str, base: str, slots: int | None, experts: int | None, fg: FamilyGrid) -> ModelSpec:
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
    finetune: Optional[FinetuneRun] = None  # a finetuning cell: its method and source checkpoint

    @property
    def variant(self) -> str:
        if self.memory_slots is not None:
            return memory_size_name(self.memory_slots)
        return f"{self.experts}x" if self.experts is not None else ""

    def tags(self, role: str = "cell") -> dict[str, str]:
        tags = {**run_tags(role, self.study), "seed": str(self.seed)}
        if role == "cell":
            tags.update(cell=self.id, budget_kind=self.budget["kind"], budget=f"{self.budget['value']:g}")
        if self.finetune is not None:
            tags["method"] = self.finetune.method
        return tags

    def run_config(self, *, workdir: Path, tracking_uri: str, parent_run_id: str | None = None,
                   run_id: str | None = None, lr: float | None = None, steps: int | None = None,
                   role: str = "cell", run_name: str | None = None, system_metrics: bool = True,
                   storage: str | None = None) -> RunConfig:
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
                        tracking=tracking, storage=storage, finetune=self.finetune,
                        workdir=str(workdir / "cells" / f"{self.name}-{self.id}" if role == "cell"
                                    else workdir / role / name))
        train.validate("train")
        cfg.validate()
        return cfg


def expand(study: Study, *, vocab_size: int | None = None, account_budgets: bool = True,
           cache_dir: Path | None = None) -> list[Cell]:
    """Every cell of the study, in grid order. With `account_budgets` (the default) each cell's
    tokens, steps and FLOPs are computed for the tokenizer's vocabulary (`vocab_size`, found
    with `vocab_size_of` when not given); raises StudyError if a budget gives no step."""
    if study.finetune is not None:  # deferred: the finetuning cells build on this module
        from memlayers.platform.finetune.cells import expand_finetune
        return expand_finetune(study, vocab_size, cache_dir)
    cells = []
    for family, base, slots, experts, fg in grid_points(study):
        spec = model_spec(family, base, slots, experts, fg)
        resources = from_dict(ResourcesConfig, fg.resources, "resources")
        for budget in study.budget.values():
            for seed in study.seeds:
                own_lr = fg.lr_for(base)
                lr_spec = own_lr if own_lr is not None else study.lr.spec()
                content = {"model": to_dict(spec), "data": to_dict(study.data), "seed": seed, "lr": lr_spec,
                           "train": {k: v for k, v in to_dict(study.train).items()
                                     if k not in ("steps", "tokens", "flops", "seed", "lr")},
                           "budget": {"kind": study.budget.kind, "value": budget}}
                digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:10]
                name = cell_run_name(
                    family, base, memory_size_name(slots) if slots else f"{experts}x" if experts else None,
                    f"{budget:.3g}".replace("e+", "e") + "F" if study.budget.kind == "iso_flops" else None, seed)
                cells.append(Cell(id=digest, name=name, study=study.name, family=family,
                                  base=base, memory_slots=slots, experts=experts, seed=seed,
                                  lr="tuned" if study.lr.tune else lr_spec, model=spec, data=study.data,
                                  train=study.train, resources=resources,
                                  budget={"kind": study.budget.kind, "value": budget}))
    if account_budgets:
        vocab = vocab_size or vocab_size_of(study.data, cache_dir)
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
    steps = budget_steps(kind, value, per_step, acc.train_flops_per_token)
    if steps < 1:
        return False
    cell.steps, cell.tokens = steps, steps * per_step
    cell.flops_per_token, cell.params, cell.active_params = (acc.train_flops_per_token, acc.total_params,
                                                             acc.active_params)
    cell.train_flops = float(cell.tokens * acc.train_flops_per_token)
    return True


def cells_by(cells: list[Cell], key: Callable[[Cell], Any]) -> dict[Any, list[Cell]]:
    """Group cells, keeping grid order: e.g. by (base, family) for learning-rate tuning."""
    groups: dict[Any, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(key(cell), []).append(cell)
    return groups

