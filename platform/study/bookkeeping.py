"""A study's own MLflow records: its parent run, its definition and cells, failed cells.

The conventions (tags, roles, names) are `tracking/conventions.py`; this module applies them to a
study: one parent run per study, reused when the study runs again; the study file and a table of
its cells logged to it (and kept in the study's record); a failed cell's run marked FAILED with its reason.
"""

from __future__ import annotations

from memlayers.platform.study.cells import Cell
from memlayers.platform.study.progress import cell_runs, latest
from memlayers.platform.study.record import StudyRecord
from memlayers.platform.study.schema import Study
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.client import client_for, search_runs, with_retry
from memlayers.platform.tracking.conventions import (
    CELLS_FILE,
    EXPERIMENT_KIND_TAG,
    FAILURE_TAG,
    MODEL_TRAINING_KIND,
    STORAGE_TAG,
    artifact_location,
    role_filter,
    run_tags,
)
from memlayers.platform.tracking.runs import oldest


def parent_run(study: Study, uri: str) -> str:
    """The study's parent run: the oldest tagged memlayers.role=study, or a new one. Its status is
    left as it is: the controller marks it RUNNING once it holds the study (lease.py)."""
    experiment_id = tracking.ensure_experiment(uri, study.name, artifact_location(uri, study.storage_root()))
    client = client_for(uri)  # a study's runs are model training: MLflow's UI then opens them, not its GenAI pages
    with_retry(lambda: client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND))
    existing = oldest(search_runs(uri, study.name, role_filter("study", study.name)))
    if existing is not None:
        return existing
    created = tracking.create_run(uri, experiment_id, study.name, run_tags("study", study.name))
    # two controllers starting a new study at once each create one: both take the oldest, the other is deleted
    chosen = oldest(search_runs(uri, study.name, role_filter("study", study.name))) or created
    if chosen != created:
        with_retry(lambda: client.delete_run(created))
    return chosen


def log_definition(study: Study, cells: list[Cell], uri: str, run_id: str, record: StudyRecord) -> None:
    """The study file (as an artifact and `study.yaml`), its cells (`cells.json`) and its settings; the
    two files in the workdir and, with storage, in the study's storage folder too."""
    client = client_for(uri)
    record.write_definition([cell_row(c) for c in cells])
    if study.file is not None:
        with_retry(lambda: client.log_artifact(run_id, str(study.file)))
    with_retry(lambda: client.log_artifact(run_id, str(record.local(CELLS_FILE))))
    tracking.set_tags(uri, run_id, {"cells": len(cells), "budget_kind": study.budget.kind, STORAGE_TAG: record.root,
                                    "lr_mode": "tuned" if study.lr.tune else "fixed"})
    tracking.log_params(uri, run_id, {"grid": {"bases": study.grid.bases, "families": study.grid.families,
                                               "memory_sizes": study.grid.memory_sizes,
                                               "experts": study.grid.experts},
                                      "budget": study.budget.values(), "seeds": study.seeds,
                                      "data": study.data.to_dict()})


def cell_row(cell: Cell) -> dict:
    """A cell as a flat row (the `study validate` table, `cells.json`)."""
    return {"id": cell.id, "name": cell.name, "family": cell.family, "base": cell.base,
            "memory_slots": cell.memory_slots or 0, "experts": cell.experts or 0, "seed": cell.seed,
            "lr": cell.lr, "params": cell.params, "active_params": cell.active_params,
            "flops_per_token": cell.flops_per_token, "tokens": cell.tokens, "steps": cell.steps,
            "train_flops": cell.train_flops, "budget": cell.budget}


def record_failure(study: Study, cell: Cell, cfg, uri: str, reason: str) -> None:
    """Mark a cell's run FAILED with its reason (creating the run if the trial died before it)."""
    run = latest(cell_runs(uri, study.name).get(cell.id, []))
    if run is not None and run.status == "FINISHED":
        return
    if run is None:
        experiment_id = tracking.ensure_experiment(uri, study.name)
        tags = {**cfg.tracking.tags, "family": cell.family, "base": cell.base}
        run_id = tracking.create_run(uri, experiment_id, cell.name, tags, cfg.tracking.parent_run_id)
    else:
        run_id = run.run_id
    tracking.set_tags(uri, run_id, {FAILURE_TAG: reason or "unknown"})
    tracking.set_status(uri, run_id, "FAILED")
