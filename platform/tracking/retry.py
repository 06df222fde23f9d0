"""The one retry layer of every MLflow call: transient failures retried with bounded backoff.

A tracking server restarting, a network partition, a proxy's 5xx or SQLite's "database is
locked" are transient: `with_retry` retries them with exponential backoff up to a deadline and
raises anything else at once. MLflow's own HTTP retries are switched off while one of our calls
runs, so there is one layer, and a caller that must not block (a training step) can ask for a
single try. `wait_for_tracking` is what a controller calls before it starts or judges cells.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Callable, TypeVar

from memlayers.platform.tracking.conventions import is_remote

T = TypeVar("T")

TRANSIENT = ("database is locked", "connection refused", "max retries exceeded", "failed to establish",
             "timed out", "connection aborted", "remote end closed", "connection reset", "temporarily unavailable")
SERVER_ERROR_RE = re.compile(r"error code 5\d\d")
RETRY_DEADLINE_S = 600.0  # how long a call waits out an outage (server restart, network partition) before failing
RETRY_MAX_DELAY_S = 15.0
ONE_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def transient(error: BaseException) -> bool:
    """A failure worth retrying: the server unreachable, answering 5xx, or SQLite's "database is locked"."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = str(error).lower()
    return any(word in text for word in TRANSIENT) or SERVER_ERROR_RE.search(text) is not None


class _OneTry:
    """MLflow's own HTTP retries (minutes of backoff inside one call) off while any call of ours runs:
    `with_retry` is the one retry layer, so a training step never blocks inside MLflow."""

    def __init__(self) -> None:
        self.lock, self.depth, self.saved = threading.Lock(), 0, {}

    def __enter__(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.saved = {k: os.environ.get(k) for k in ONE_TRY}
                os.environ.update(ONE_TRY)
            self.depth += 1

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for key, value in self.saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


ONE_TRY_SCOPE = _OneTry()


def with_retry(call: Callable[[], T], deadline_s: float = RETRY_DEADLINE_S, delay: float = 0.25) -> T:
    """Run `call`, retrying transient failures (`transient`) with exponential backoff for up to
    `deadline_s`; any other failure, or one past the deadline, is raised."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            with ONE_TRY_SCOPE:
                return call()
        except Exception as error:  # MlflowException wraps connection errors and sqlalchemy's OperationalError
            if not transient(error) or time.monotonic() + delay > give_up:
                raise
        time.sleep(delay)
        delay = min(2 * delay, RETRY_MAX_DELAY_S)


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer within the time allowed."""


def wait_for_tracking(uri: str, timeout_s: float = RETRY_DEADLINE_S, out: Callable[[str], None] | None = None) -> None:
    """Return once the tracking server of `uri` answers its /health check (at once for a local store);
    raise TrackingUnavailable naming it after `timeout_s`. `out` hears once that it is waiting."""
    if not is_remote(uri):
        return
    import requests  # deferred: only a tracking server needs it
    health, give_up, delay, told = uri.rstrip("/") + "/health", time.monotonic() + timeout_s, 0.5, False
    while True:
        try:
            if requests.get(health, timeout=10).status_code == 200:
                return
            problem = "it answers /health with an error"
        except requests.RequestException as error:
            problem = f"{type(error).__name__}"
        if time.monotonic() + delay > give_up:
            raise TrackingUnavailable(f"tracking server {uri} unreachable for {timeout_s:.0f} s ({problem}): "
                                      "start it or check tracking.uri")
        if out is not None and not told:
            out(f"waiting up to {timeout_s:.0f} s for the tracking server {uri} ({problem})")
            told = True
        time.sleep(delay)
        delay = min(2 * delay, RETRY_MAX_DELAY_S)
