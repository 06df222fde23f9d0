"""A study's runs by cell, read from MLflow with one search, and the run that speaks for each cell.

Below the study and eval packages: the controller's progress and bookkeeping and the eval stage's
targets all read a study's cells this way. A SQLite store that does not exist yet is not created
(no runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from memlayers.platform.tracking.client import search_runs
from memlayers.platform.tracking.conventions import RUN_NAME_TAG, role_filter

_STATE_OF = {"FINISHED": "done", "RUNNING": "running", "SCHEDULED": "running", "FAILED": "failed", "KILLED": "failed"}


@dataclass
class CellRun:
    run_id: str
    cell: str
    name: str
    status: str                         # MLflow: RUNNING | FINISHED | FAILED | KILLED
    start_time: int
    metrics: dict
    tags: dict
    end_time: int = 0                   # ms since the epoch; 0 while the run has not ended

    @property
    def state(self) -> str:
        return _STATE_OF.get(self.status, "failed")


def cell_runs(tracking_uri: str, study: str, role: str = "cell") -> dict[str, list[CellRun]]:
    """The study's runs of `role` by cell id (tuning runs by their group), oldest first."""
    runs = search_runs(tracking_uri, study, role_filter(role, study))
    by_cell: dict[str, list[CellRun]] = {}
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        tags = run.data.tags
        key = tags.get("cell") or tags.get("tuning_group") or run.info.run_id
        by_cell.setdefault(key, []).append(CellRun(run.info.run_id, key, tags.get(RUN_NAME_TAG, ""),
                                                   run.info.status, run.info.start_time or 0,
                                                   dict(run.data.metrics), dict(tags), run.info.end_time or 0))
    return by_cell


def latest(runs: list[CellRun]) -> Optional[CellRun]:
    """The run that speaks for a cell: the finished one started last if any (ties: the larger run id,
    as the fit picks in `tracking.runs.load_study_rows`), else the newest."""
    finished = [r for r in runs if r.status == "FINISHED"]
    return (finished or runs or [None])[-1]
