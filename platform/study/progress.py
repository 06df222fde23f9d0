"""Where a study stands, read from MLflow: each cell's state, and the progress lines printed while it runs.

A cell is *done* when its run (tag `memlayers.role=cell`, `cell=<id>`) is FINISHED, *failed* when
it is FAILED or KILLED, *running* when RUNNING, *pending* when it has no run yet. The runs come
from `tracking.cell_runs` (one search; a SQLite store that does not exist yet is not created).
`ProgressPrinter` polls in a background thread and prints a line whenever the counts or the
running cells' step and loss change.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional

from memlayers.platform.tracking.cell_runs import CellRun, cell_runs, latest
from memlayers.platform.tracking.conventions import read_progress

STATES: tuple[str, ...] = ("done", "running", "failed", "pending")


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
