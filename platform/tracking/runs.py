"""A study's runs in MLflow: read the finished cell runs as rows, attach fitted laws to the parent.

A study's runs live in the MLflow experiment named after the study. Each finished cell run carries
tags `memlayers.role=cell`, `study`, `cell`, `family`, `base`, `memory_slots`, `experts`,
`train_flops`, `total_params`, `active_params` and final metrics `val_loss`, `qa_exact_match`,
`qa_answer_nll` (recall metrics may be missing). The study's parent run is tagged
`memlayers.role=study`. Fits and reports read the runs of the cells the study defines now
(`<workdir>/cells.json`), not those of an earlier version of its file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from memlayers.platform.tracking.client import client_for, search_all_runs
from memlayers.platform.tracking.conventions import CELLS_FILE, EVAL_PREFIX, role_filter

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


def load_study_rows(experiment_name: str, tracking_uri: str, workdir: Path | str | None = None) -> list[dict]:
    """Rows of the finished cell runs of the experiment `experiment_name`.

    With `workdir` holding a `cells.json` (the study's current definition), only the runs of
    those cells: a study whose file changed keeps its earlier cells' runs in the same experiment,
    and laws or claims fitted over both would mix two designs."""
    client = client_for(tracking_uri)
    experiment_id = _experiment_id(client, experiment_name, tracking_uri)
    runs = search_all_runs(client, experiment_id, role_filter("cell") + " and attributes.status = 'FINISHED'")
    rows = [run_to_row(run) for run in runs]
    table = Path(workdir) / CELLS_FILE if workdir is not None else None
    if table is not None and table.is_file():
        current = {cell["id"] for cell in json.loads(table.read_text())}
        rows = [row for row in rows if row["cell"] in current]
    return rows


def parent_run_id(experiment_name: str, tracking_uri: str) -> str | None:
    """The study's parent run (tag memlayers.role=study), newest first; None if there is none."""
    client = client_for(tracking_uri)
    runs = search_all_runs(client, _experiment_id(client, experiment_name, tracking_uri), role_filter("study"))
    if not runs:
        return None
    return max(runs, key=lambda r: r.info.start_time or 0).info.run_id


def log_laws_artifact(experiment_name: str, tracking_uri: str, path: str | Path,
                      artifact_path: str = "laws", run_id: str | None = None) -> str | None:
    """Log the file `path` under `artifact_path` of the study's parent run (or `run_id`);
    returns the run id, or None when the study has no parent run."""
    run_id = run_id or parent_run_id(experiment_name, tracking_uri)
    if run_id is not None:
        client_for(tracking_uri).log_artifact(run_id, str(path), artifact_path=artifact_path)
    return run_id
