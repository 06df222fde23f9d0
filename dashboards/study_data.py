"""A study read back from MLflow: its parent run, every cell run, metric histories, its definition.

Everything the report shows comes from here, so the report works on any study store, finished or
not: the run of each of the study's current cells (study/record.py: the cells of its current study
file; runs of an earlier version of the file are left out), of every status (finished, failed,
running), with its tags and final metrics; the metric histories the training-curve and slot-usage
plots need; and the study's YAML (the study file when the reference names one, else its record's).
A cell with several runs is shown by the one that speaks for it (`study.progress.latest`).
Conventions read (set by the study controller and the trainer): experiment = study name; parent
run tagged `memlayers.role=study`; cell runs tagged `memlayers.role=cell`, `cell`, `family`,
`base`, `memory_slots`, `experts`, `train_flops`, `total_params`, `active_params`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from memlayers.models.config import FAMILIES
from memlayers.models.presets import BASES, memory_size_name
from memlayers.platform.study.record import StudyRecord
from memlayers.platform.tracking.client import search_all_runs
from memlayers.platform.tracking.conventions import RUN_NAME_TAG, role_filter
from memlayers.platform.tracking.runs import oldest
from memlayers.platform.tracking.study_ref import StudyRef

FINAL_METRICS = ("val_loss", "qa_exact_match", "qa_answer_nll", "loss")
HISTORY_METRICS = ("loss", "tokens", "val_loss", "slot_fraction_read", "slot_gini")


def _number(text: str | None, default: float | None = None) -> float | None:
    try:
        return float(text) if text not in (None, "") else default
    except ValueError:
        return default


@dataclass
class Cell:
    """One cell's MLflow run: identity, status, tags, params and final metrics."""

    run_id: str
    run_name: str
    status: str                                   # FINISHED | FAILED | RUNNING | KILLED | SCHEDULED
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]                     # latest value of each metric

    @property
    def cell_id(self) -> str:
        return self.tags.get("cell", self.run_id[:8])

    @property
    def family(self) -> str:
        return self.tags.get("family", "?")

    @property
    def base(self) -> str:
        return self.tags.get("base", "?")

    @property
    def memory_slots(self) -> int:
        return int(_number(self.tags.get("memory_slots"), 0) or 0)

    @property
    def experts(self) -> int:
        return int(_number(self.tags.get("experts"), 0) or 0)

    @property
    def train_flops(self) -> float | None:
        """Training FLOPs: the planned total (tag, what the laws are fitted on) for a finished run;
        the logged cumulative count for a run that stopped early."""
        planned, spent = _number(self.tags.get("train_flops")), self.metrics.get("train_flops")
        return (planned or spent) if self.finished else (spent or planned)

    @property
    def seed(self) -> int | None:
        value = _number(self.params.get("train.seed"))
        if value is None:
            match = re.search(r"seed(\d+)$", self.run_name)
            return int(match.group(1)) if match else None
        return int(value)

    @property
    def failure_reason(self) -> str:
        return self.tags.get("failure_reason", "")

    @property
    def variant(self) -> str:
        """What distinguishes the cell within its family and base: memory size or experts."""
        if self.memory_slots:
            return memory_size_name(self.memory_slots)
        if self.experts:
            return f"{self.experts}x"
        return ""

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED"


@dataclass
class StudyData:
    ref: StudyRef
    experiment_id: str | None = None
    parent_run_id: str | None = None
    parent_tags: dict[str, str] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    # run -> metric -> (step, value)
    histories: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    definition: str | None = None                # the study YAML
    definition_source: str = ""                  # where it came from

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for cell in self.cells:
            counts[cell.status] = counts.get(cell.status, 0) + 1
        return counts

    def finished_cells(self) -> list[Cell]:
        return [cell for cell in self.cells if cell.finished]


def _client(uri: str):
    from mlflow.tracking import MlflowClient  # deferred: mlflow is heavy and only this path needs it

    return MlflowClient(tracking_uri=uri)


def load_histories(client, cells: list[Cell], metrics: tuple[str, ...] = HISTORY_METRICS) -> dict:
    """Metric histories (step, value), sorted by step, for the metrics each run logged."""
    histories: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for cell in cells:
        per_run = {}
        for key in metrics:
            if key in cell.metrics:
                points = client.get_metric_history(cell.run_id, key)
                per_run[key] = sorted((int(m.step), float(m.value)) for m in points)
        histories[cell.run_id] = per_run
    return histories


def _speaking_runs(runs: list, current: set[str] | None) -> list:
    """One run per cell of `current` (all cells when None): its finished run started last, else its newest."""
    by_cell: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        cell = run.data.tags.get("cell") or run.info.run_id
        if current is None or cell in current:
            by_cell.setdefault(cell, []).append(run)
    return [([r for r in found if r.info.status == "FINISHED"] or found)[-1] for found in by_cell.values()]


def load_study(ref: StudyRef, *, with_histories: bool = True) -> StudyData:
    """Read everything about study `ref` from its tracking store (missing pieces stay empty)."""
    data = StudyData(ref=ref)
    record = StudyRecord.of_ref(ref)
    client = _client(ref.tracking_uri)
    experiment = client.get_experiment_by_name(ref.name)
    if experiment is None:
        data.definition, data.definition_source = record.definition()
        return data
    data.experiment_id = experiment.experiment_id
    parents = search_all_runs(client, data.experiment_id, role_filter("study"))
    if parents:
        parent = next(run for run in parents if run.info.run_id == oldest(parents))
        data.parent_run_id, data.parent_tags = parent.info.run_id, dict(parent.data.tags)
    runs = search_all_runs(client, data.experiment_id, role_filter("cell"))
    for run in _speaking_runs(runs, record.current_cells()):
        tags = dict(run.data.tags)
        data.cells.append(Cell(run_id=run.info.run_id, run_name=run.info.run_name or tags.get(RUN_NAME_TAG, ""),
                               status=run.info.status, tags=tags, params=dict(run.data.params),
                               metrics=dict(run.data.metrics)))
    data.cells.sort(key=cell_order)
    if with_histories:
        data.histories = load_histories(client, data.cells)
    data.definition, data.definition_source = record.definition()
    return data


FAMILY_ORDER = FAMILIES  # display order: the family registry's


def base_order(base: str) -> tuple[int, str]:
    names = list(BASES)
    return (names.index(base) if base in names else len(names), base)


def cell_order(cell: Cell) -> tuple:
    family = FAMILY_ORDER.index(cell.family) if cell.family in FAMILY_ORDER else len(FAMILY_ORDER)
    return (family, base_order(cell.base), cell.memory_slots, cell.experts, cell.seed or 0, cell.run_name)
