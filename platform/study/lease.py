"""One controller per study: a file lock on its work directory, and a lease on its parent MLflow run.

A second `study run` of a study that is running would adopt the first one's RUNNING cell runs, mark
its tuning runs KILLED and train cells twice. So the controller holds, for as long as it runs:

- `controller.lock` in the work directory, locked with `flock`: the kernel releases it when the
  holder dies, however it dies, so a killed controller never blocks the next one. The file names the
  holder (owner, host, pid, since) for the refusal's message.
- with a tracking server or storage apart from the workdir (a laptop and a cluster, a re-submitted
  job: controllers that share no disk), a lease on the study's parent run: the tag
  `memlayers.controller` holds owner, host, pid and a heartbeat time that a background thread
  refreshes. A controller takes a lease whose heartbeat is older than `stale_s` (its holder was
  killed or lost); MLflow has no compare-and-swap, so the taker reads the tag back after a settling
  delay and yields if another controller wrote after it.

Either refusal is `StudyLocked`: one line naming the holder, raised before anything is started.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from memlayers.config_schema import ConfigError
from memlayers.platform.study.schema import StudyError
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import CONTROLLER_TAG

LOCK_FILE = "controller.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0          # six missed heartbeats: a holder this quiet is dead or cut off
SETTLE_S = 2.0          # longer than a tag write takes to be visible to another controller


class StudyLocked(StudyError):
    """Another controller holds the study; the one line names it."""

    def __init__(self, study: str, holder: "Holder", where: str) -> None:
        super().__init__([ConfigError("study", f"{study} is being run by another controller ({holder.describe()}; "
                                               f"{where}); wait for it to end or stop that process")])
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    owner: str                          # a fresh id per controller
    host: str
    pid: int
    heartbeat: float                    # unix time of its last sign of life

    @classmethod
    def me(cls) -> "Holder":
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), time.time())

    def beat(self) -> "Holder":
        return Holder(self.owner, self.host, self.pid, time.time())

    def dumps(self) -> str:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": self.pid, "heartbeat": self.heartbeat})

    @classmethod
    def loads(cls, text: Optional[str]) -> Optional["Holder"]:
        try:
            data = json.loads(text or "")
            return cls(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["heartbeat"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, last seen {max(0.0, time.time() - self.heartbeat):.0f} s ago"


@contextlib.contextmanager
def file_lock(study: str, workdir: Path, me: Holder) -> Iterator[Path]:
    """Hold `<workdir>/controller.lock` (StudyLocked when another live process holds it)."""
    path = Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.loads(path.read_text()) or Holder("?", "?", -1, time.time())
            raise StudyLocked(study, holder, f"lock {path}") from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, me.dumps().encode(), 0)
        os.fsync(handle)
        yield path
    finally:
        os.close(handle)  # closing releases the flock


class Lease:
    """The lease on a study's parent run (see the module docstring)."""

    def __init__(self, study: str, uri: str, run_id: str, me: Holder, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S, settle_s: float = SETTLE_S, out: Callable[[str], None] = print) -> None:
        self.study, self.uri, self.run_id, self.me = study, uri, run_id, me
        self.heartbeat_s, self.stale_s, self.settle_s, self.out = heartbeat_s, stale_s, settle_s, out
        self.lost: Optional[Holder] = None      # who took the lease from under this controller, if anyone
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def holder(self) -> Optional[Holder]:
        run = tracking.with_retry(lambda: tracking.client_for(self.uri).get_run(self.run_id))
        return Holder.loads(run.data.tags.get(CONTROLLER_TAG))

    def _refuse_if_held(self) -> None:
        holder = self.holder()
        if holder is not None and holder.owner != self.me.owner and time.time() - holder.heartbeat < self.stale_s:
            raise StudyLocked(self.study, holder, f"lease on run {self.run_id}")

    def acquire(self) -> None:
        """Take the lease, or raise StudyLocked naming its live holder."""
        self._refuse_if_held()
        self.me = self.me.beat()
        tracking.set_tags(self.uri, self.run_id, {CONTROLLER_TAG: self.me.dumps()})
        time.sleep(self.settle_s)
        holder = self.holder()
        if holder is None or holder.owner != self.me.owner:  # another controller wrote after this one: it has it
            raise StudyLocked(self.study, holder or self.me, f"lease on run {self.run_id}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self.holder()
                if holder is not None and holder.owner != self.me.owner:
                    self.lost = holder
                    self.out(f"warning: study {self.study}: another controller took the lease ({holder.describe()})")
                    return
                self.me = self.me.beat()
                tracking.set_tags(self.uri, self.run_id, {CONTROLLER_TAG: self.me.dumps()})
            except Exception as error:  # a tracking outage: keep beating; the lease goes stale only if it lasts
                self.out(f"warning: study {self.study}: lease heartbeat failed ({type(error).__name__})")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
        with contextlib.suppress(Exception):  # a lease that cannot be cleared goes stale by itself
            holder = self.holder()
            if holder is not None and holder.owner == self.me.owner:
                tracking.with_retry(lambda: tracking.client_for(self.uri).delete_tag(self.run_id, CONTROLLER_TAG))

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="study-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
