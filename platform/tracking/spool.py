"""A run's metrics and tags that the tracking store has not acknowledged yet, kept on disk.

While the tracking server is unreachable, training goes on and what it logs waits here, in the
run's work directory (`<workdir>/tracking-spool/<run id>.metrics.jsonl` and `.tags.json`), so a
restarted worker on the same machine still sends it. A metric keeps the timestamp it was taken
with, so sending it twice (the store applied a batch whose answer was lost) writes the same row.
What the store acknowledged is removed at once: the file holds exactly what is still owed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from memlayers.platform.cluster.storage import write_local_atomic

Record = tuple[str, float, int, int]  # key, value, timestamp (ms), step
MAX_SPOOLED = 200_000  # metric values held before the writer waits for the store instead of spooling more


class Spool:
    """The unacknowledged metrics (in order) and tags (latest value per key) of run `run_id`."""

    def __init__(self, folder: Path, run_id: str) -> None:
        self.folder = Path(folder)
        self.metrics_path = self.folder / f"{run_id}.metrics.jsonl"
        self.tags_path = self.folder / f"{run_id}.tags.json"

    # ---- metrics -------------------------------------------------------------------------
    def metrics(self) -> list[Record]:
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                key, value, stamp, step = json.loads(line)
            except ValueError:  # the last line of a writer killed mid-append
                continue
            records.append((str(key), float(value), int(stamp), int(step)))
        return records

    def append_metrics(self, records: Iterable[Record]) -> None:
        lines = "".join(json.dumps(list(r)) + "\n" for r in records)
        if not lines:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def acknowledge_metrics(self, count: int) -> None:
        """The first `count` spooled metrics are in the store: forget them."""
        rest = self.metrics()[count:]
        if rest:
            write_local_atomic(self.metrics_path, "".join(json.dumps(list(r)) + "\n" for r in rest).encode())
        else:
            self.metrics_path.unlink(missing_ok=True)

    def max_step(self) -> int:
        return max((r[3] for r in self.metrics()), default=-1)

    # ---- tags ----------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.tags_path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def put_tags(self, tags: dict[str, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_local_atomic(self.tags_path, json.dumps({**self.tags(), **tags}).encode())

    def acknowledge_tags(self, sent: dict[str, str]) -> None:
        """Forget the tags sent, unless a newer value replaced them meanwhile."""
        rest = {k: v for k, v in self.tags().items() if sent.get(k) != v}
        if rest:
            write_local_atomic(self.tags_path, json.dumps(rest).encode())
        else:
            self.tags_path.unlink(missing_ok=True)
