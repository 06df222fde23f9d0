"""A local Ray cluster dies with its driver: a watchdog process that reaps what the driver started.

If the driver is SIGKILLed, Ray's agents would otherwise outlive it for a minute or more,
retrying a GCS that is gone. The watchdog reads a pipe from the driver; when the pipe closes
without "done", it kills every descendant of the driver started after the cluster came up.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import psutil


@contextlib.contextmanager
def reaper(since: float, enabled: bool = True):
    """A watchdog process that kills the Ray processes this driver started if the driver dies
    without shutting them down (SIGKILL). Ray's agents would otherwise outlive the driver for a
    minute or more, retrying a GCS that is gone."""
    if not enabled:
        yield
        return
    code = f"from memlayers.platform.cluster.reaper import reap; reap({os.getpid()}, {since!r})"
    watchdog = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            watchdog.stdin.write("done\n")
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)


def reap(driver_pid: int, since: float, interval: float = 0.5) -> None:
    """Watch `driver_pid`'s descendants started after `since`; kill them when the driver's pipe
    closes without "done" (the driver died)."""
    released = threading.Event()
    finished = threading.Event()

    def read() -> None:
        if sys.stdin.readline().strip() == "done":
            released.set()
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    known: dict[int, psutil.Process] = {}
    while not finished.wait(interval):
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(driver_pid).children(recursive=True):
                if child.pid != os.getpid() and child.create_time() >= since - 1:
                    known.setdefault(child.pid, child)
    if released.is_set():
        return
    for proc in known.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running():  # also checks the pid was not reused
                proc.kill()
