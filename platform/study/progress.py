"""Where a study stands, read from MLflow: each cell's run, and the progress lines printed while it runs.

A cell is *done* when its run (tag `memlayers.role=cell`, `cell=<id>`) is FINISHED, *failed* when
it is FAILED or KILLED, *running* when RUNNING, *pending* when it has no run yet. `cell_runs` reads
them with one search; a SQLite store that does not exist yet is not created (no runs).
`ProgressPrinter` polls in a background thread and prints a line whenever the counts or the
running cells' step and loss change.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from memlayers.platform.tracking.client import search_runs
from memlayers.platform.tracking.conventions import RUN_NAME_TAG, read_progress, role_filter

STATES: tuple[str, ...] = ("done", "running", "failed", "pending")
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


def cell_states(cell_ids: Iterable[str], runs: dict[str, list[CellRun]]) -> dict[str, str]:
    """done | running | failed | pending for each cell id."""
    states = {}
    for cell_id in cell_ids:
        run = latest(runs.get(cell_id, []))
        states[cell_id] = run.state if run is not None else "pending"
    return states


def counts(states: dict[str, str]) -> dict[str, int]:
    return {state: sum(1 for s in states.values() if s == state) for state in STATES}


def summary_line(states: dict[str, str]) -> str:
    c = counts(states)
    return f"cells {c['done']}/{len(states)} done, {c['running']} running, {c['failed']} failed, {c['pending']} pending"


class ProgressPrinter:
    """Polls the study's runs every `interval` seconds and prints a line when anything changed."""

    def __init__(self, tracking_uri: str, study: str, cells: list, out: Callable[[str], None] = print,
                 interval: float = 2.0) -> None:
        self.uri, self.study, self.out, self.interval = tracking_uri, study, out, interval
        self.names = {c.id: c.name for c in cells}
        self.steps = {c.id: c.steps for c in cells}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last = ""

    def line(self) -> str:
        runs = cell_runs(self.uri, self.study)
        states = cell_states(self.names, runs)
        parts = [summary_line(states)]
        for cell_id, state in states.items():
            if state != "running":
                continue
            live = read_progress(latest(runs[cell_id]).tags)
            if live is not None:
                step, loss, rate = live
                parts.append(f"{self.names[cell_id]} step {step}/{self.steps[cell_id]} loss {loss:.4g} "
                             f"{rate:,.0f} tok/s")
            else:
                parts.append(f"{self.names[cell_id]} starting")
        return " | ".join(parts)

    def poll(self) -> None:
        try:
            line = self.line()
        except Exception:  # a busy SQLite store: try again next time
            return
        if line != self._last:
            self._last = line
            self.out(f"[{time.monotonic() - self.started:6.0f}s] {line}")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> "ProgressPrinter":
        self._thread = threading.Thread(target=self._loop, name="study-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()
