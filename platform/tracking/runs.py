"""A study's runs in MLflow: read the finished cell runs as rows, attach fitted laws to the parent.

A study's runs live in the MLflow experiment named after the study. Each finished cell run carries
tags `memlayers.role=cell`, `study`, `cell`, `family`, `base`, `memory_slots`, `experts`,
`train_flops`, `total_params`, `active_params` and final metrics `val_loss`, `qa_exact_match`,
`qa_answer_nll` (recall metrics may be missing). The study's parent run is tagged
`memlayers.role=study`. Which cells are current is the study record's to say (`study/record.py`);
fits and reports pass their ids here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from memlayers.platform.tracking.client import client_for, search_all_runs
from memlayers.platform.tracking.conventions import EVAL_PREFIX, role_filter

METRICS = ("val_loss", "qa_exact_match", "qa_answer_nll",
           "new_qa_exact_match", "old_qa_exact_match", "forgetting")  # the last 3: finetuning cells
INT_TAGS = ("memory_slots", "experts", "seed")
FLOAT_TAGS = ("train_flops", "total_params", "active_params")
TEXT_TAGS = ("study", "cell", "family", "base", "budget", "method")  # method: finetuning cells


def _experiment_id(client, experiment_name: str, tracking_uri: str) -> str:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no MLflow experiment named {experiment_name!r} at {tracking_uri}")
    return experiment.experiment_id


def _number(text, cast):
    try:
        return cast(float(text)) if text not in (None, "") else None
    except ValueError:
        return None


def run_to_row(run) -> dict:
    """One cell run as a plain dict (None for missing tags or metrics)."""
    tags, metrics = run.data.tags, run.data.metrics
    row: dict = {"run_id": run.info.run_id}
    row.update({k: tags.get(k) for k in TEXT_TAGS})
    row.update({k: _number(tags.get(k), int) for k in INT_TAGS})
    row.update({k: _number(tags.get(k), float) for k in FLOAT_TAGS})
    for k in METRICS:
        value = metrics.get(k)
        row[k] = float(value) if value is not None and math.isfinite(value) else None
    for k, value in metrics.items():  # downstream scores: eval/<task>/<metric>
        if k.startswith(EVAL_PREFIX) and math.isfinite(value):
            row[k] = float(value)
    row["memory_slots"] = row["memory_slots"] or 0
    row["experts"] = row["experts"] or 0
    return row


def _speaks_for_its_cell(run) -> tuple:
    """The order in which a cell's FINISHED runs are ranked: the one started last (ties: the larger
    run id) speaks for the cell, as in `study status` and the eval stage (`study.progress.latest`)."""
    return (run.info.start_time or 0, run.info.run_id)


def load_study_rows(experiment_name: str, tracking_uri: str, *, cells: Iterable[str] | None = None,
                    notes: list[str] | None = None) -> list[dict]:
    """Rows of the finished cell runs of the experiment `experiment_name`, one per cell.

    `cells` (the ids of the study's current cells) keeps only their runs: a study whose file changed
    keeps its earlier cells' runs in the same experiment, and laws or claims fitted over both would
    mix two designs. A cell with several FINISHED runs (two controllers of one study, before the
    study lock) is fitted once, on the run `_speaks_for_its_cell` picks; each such choice is
    appended to `notes`."""
    client = client_for(tracking_uri)
    experiment_id = _experiment_id(client, experiment_name, tracking_uri)
    runs = search_all_runs(client, experiment_id, role_filter("cell") + " and attributes.status = 'FINISHED'")
    current = set(cells) if cells is not None else None
    by_cell: dict[str, list] = {}
    for run in sorted(runs, key=_speaks_for_its_cell):
        cell = run.data.tags.get("cell") or run.info.run_id
        if current is None or cell in current:
            by_cell.setdefault(cell, []).append(run)
    rows = []
    for cell, found in by_cell.items():
        chosen = found[-1]
        if len(found) > 1 and notes is not None:
            others = ", ".join(r.info.run_id for r in found[:-1])
            notes.append(f"cell {cell}: {len(found)} FINISHED runs; fitted {chosen.info.run_id} "
                         f"(started last), left out {others}")
        rows.append(run_to_row(chosen))
    return rows


def parent_run_id(experiment_name: str, tracking_uri: str) -> str | None:
    """The study's parent run (tag memlayers.role=study): the oldest, the one the controller reuses;
    None if there is none."""
    client = client_for(tracking_uri)
    runs = search_all_runs(client, _experiment_id(client, experiment_name, tracking_uri), role_filter("study"))
    return oldest(runs)


def oldest(runs: list) -> str | None:
    """The run id of the run started first (ties: the smaller id); None for no runs."""
    return min(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)).info.run_id if runs else None


def log_laws_artifact(experiment_name: str, tracking_uri: str, path: str | Path,
                      artifact_path: str, run_id: str | None = None) -> str | None:
    """Log the file `path` under `artifact_path` of the study's parent run (or `run_id`);
    returns the run id, or None when the study has no parent run."""
    run_id = run_id or parent_run_id(experiment_name, tracking_uri)
    if run_id is not None:
        client_for(tracking_uri).log_artifact(run_id, str(path), artifact_path=artifact_path)
    return run_id
