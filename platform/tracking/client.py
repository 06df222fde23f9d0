"""MLflow tracking of training runs: one run per training run, logged from one process.

The driver creates the run (or continues an existing one: a study resuming a cell, a restarted
worker group), logs the flattened config as params and the accounting as tags; rank 0 of the
workers logs metrics. Metrics are buffered and flushed right before each checkpoint, so a worker
that dies replays exactly the steps after the last checkpoint and every step is logged once.
Every call goes through one retry layer (`retry.py`), which waits out a tracking-server outage;
a training run's metrics and live tags are spooled on disk meanwhile (`MetricBuffer`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from memlayers.config_schema import flatten
from memlayers.platform.tracking.conventions import PARENT_TAG, RUN_NAME_TAG, store_exists
from memlayers.platform.tracking.retry import RETRY_DEADLINE_S, RETRY_MAX_DELAY_S, transient, with_retry
from memlayers.platform.tracking.spool import MAX_SPOOLED, Record, Spool

SEARCH_DEADLINE_S = 60.0  # searches serve status lines and reports: fail within a minute rather than hang

def client_for(uri: str):
    from mlflow.tracking import MlflowClient  # deferred: mlflow is heavy and only this path needs it
    return MlflowClient(tracking_uri=uri)


def search_all_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment matching `filter_string`, across result pages."""
    runs, token = [], None
    while True:
        page = with_retry(lambda token=token: client.search_runs([experiment_id], filter_string=filter_string,
                                                                 max_results=1000, page_token=token),
                          SEARCH_DEADLINE_S)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def search_runs(uri: str, experiment: str, filter_string: str) -> list:
    """All runs of experiment `experiment` matching `filter_string` ([] if the store or the
    experiment is missing; a sqlite store that does not exist is not created)."""
    if not store_exists(uri):
        return []
    client = client_for(uri)
    found = with_retry(lambda: client.get_experiment_by_name(experiment), SEARCH_DEADLINE_S)
    return [] if found is None else search_all_runs(client, found.experiment_id, filter_string)


def ensure_experiment(uri: str, name: str, artifact_root: Path | str | None = None) -> str:
    """The id of experiment `name`, created (with artifacts under `artifact_root`: a local folder or
    a URI; None for the store's default) if missing."""
    client = client_for(uri)
    experiment = with_retry(lambda: client.get_experiment_by_name(name))
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if isinstance(artifact_root, Path) else artifact_root
    try:
        return with_retry(lambda: client.create_experiment(name, artifact_location=location))
    except Exception:
        experiment = with_retry(lambda: client.get_experiment_by_name(name))  # created concurrently
        if experiment is None:
            raise
        return experiment.experiment_id


def create_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
               parent_run_id: str | None = None) -> str:
    client = client_for(uri)
    all_tags = {**tags, RUN_NAME_TAG: run_name}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = with_retry(lambda: client.create_run(experiment_id, tags=all_tags, run_name=run_name))
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log a (nested) config as flat params; keys already logged are left as they are."""
    from mlflow.entities import Param  # deferred: mlflow is heavy and only this path needs it
    client = client_for(uri)
    existing = with_retry(lambda: client.get_run(run_id)).data.params
    flat = {k: str(v)[:6000] for k, v in flatten(params).items() if k not in existing}
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        with_retry(lambda start=start: client.log_batch(run_id, params=items[start:start + 100]))


def set_tags(uri: str, run_id: str, tags: dict[str, Any], deadline_s: float = RETRY_DEADLINE_S) -> None:
    from mlflow.entities import RunTag  # deferred: mlflow is heavy and only this path needs it
    client = client_for(uri)
    with_retry(lambda: client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]), deadline_s)


def set_status(uri: str, run_id: str, status: str) -> None:
    """FINISHED | FAILED | KILLED | RUNNING."""
    client = client_for(uri)
    if status == "RUNNING":
        with_retry(lambda: client.update_run(run_id, status="RUNNING"))
    else:
        with_retry(lambda: client.set_terminated(run_id, status=status))


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log `metrics` at `step` in one batch (e.g. a finished run's downstream scores)."""
    from mlflow.entities import Metric  # deferred: mlflow is heavy and only this path needs it
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
    client = client_for(uri)
    for start in range(0, len(batch), 500):
        with_retry(lambda start=start: client.log_batch(run_id, metrics=batch[start:start + 500]))


def _metrics(records: list[Record]) -> list:
    from mlflow.entities import Metric  # deferred: mlflow is heavy and only this path needs it
    return [Metric(key, value, stamp, step) for key, value, stamp, step in records]


class MetricBuffer:
    """A training run's metrics and live tags, sent so that every step is logged exactly once.

    Step metrics are held until `flush` (right before a checkpoint): a worker restarted from that
    checkpoint calls `skip_logged`, and the steps it replays that were flushed before it died are
    dropped. With a `spool_dir`, a flush the store does not acknowledge (server down) is kept on
    disk (`spool.py`) and training goes on; the next flushes resend it, at most once per backoff
    delay, so a long outage costs no time per step. `drain` (the run's end) waits for the store.
    """

    def __init__(self, uri: str, run_id: str, spool_dir: Optional[Path] = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.pending: list[Record] = []
        self.logged_through = -1        # steps up to this one are in the store (or owed to it, spooled)
        self.spool = Spool(Path(spool_dir) / "tracking-spool", run_id) if spool_dir is not None else None
        self.next_try, self.backoff = 0.0, 0.0

    def skip_logged(self) -> None:
        """Read the newest training step the run has logged or spooled; later `add`s up to it are dropped."""
        client = client_for(self.uri)
        run = with_retry(lambda: client.get_run(self.run_id))
        keys = [k for k in run.data.metrics if not k.startswith("system/")]  # own steps
        steps = [m.step for key in keys
                 for m in with_retry(lambda key=key: client.get_metric_history(self.run_id, key))]
        self.logged_through = max([*steps, self.spool.max_step() if self.spool else -1], default=-1)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_through:
            stamp = int(time.time() * 1000)
            self.pending.extend((k, float(v), stamp, step) for k, v in metrics.items())

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Live tags (progress): sent now if the store answers, else spooled (the newest value per key)."""
        tags = {k: str(v) for k, v in tags.items()}
        if self.spool is None:
            set_tags(self.uri, self.run_id, tags)
            return
        if not self.spool.tags() and self._attempt(lambda: set_tags(self.uri, self.run_id, tags, deadline_s=0.0)):
            return
        self.spool.put_tags(tags)
        self._send(wait=False)

    def flush(self) -> bool:
        """Send the held metrics (and anything spooled); False when the store is unreachable and they wait on disk."""
        records, self.pending = self.pending, []
        if self.spool is None:
            self._send_metrics(records, RETRY_DEADLINE_S)
            return True
        if not self.spool.metrics():  # the usual case: straight to the store, and only what it did not take spooled
            sent: list[int] = []
            if self._attempt(lambda: self._send_metrics(records, 0.0, sent.append)):
                return self._send(wait=False) if self.spool.tags() else True
            records = records[sum(sent):]
        self.spool.append_metrics(records)
        return self._send(wait=len(self.spool.metrics()) > MAX_SPOOLED)

    def drain(self) -> None:
        """Send everything held or spooled, waiting out an outage (up to RETRY_DEADLINE_S)."""
        if not self.flush() and self.spool is not None:
            self._send(wait=True)

    def _send(self, wait: bool) -> bool:
        """Send what is spooled: one try (unless within a backoff delay), or waiting out an outage."""
        if not wait:
            return self._attempt(lambda: self._send_spooled(0.0))
        self._send_spooled(RETRY_DEADLINE_S)
        self.next_try, self.backoff = 0.0, 0.0
        return True

    def _attempt(self, call: Callable[[], None]) -> bool:
        """One try of `call`, skipped within a backoff delay; False (the delay doubled) if the store is unreachable."""
        if time.monotonic() < self.next_try:
            return False
        try:
            call()
        except Exception as error:
            if not transient(error):
                raise
            self.backoff = min(max(2 * self.backoff, 1.0), RETRY_MAX_DELAY_S)
            self.next_try = time.monotonic() + self.backoff
            return False
        self.next_try, self.backoff = 0.0, 0.0
        return True

    def _send_spooled(self, deadline_s: float) -> None:
        self._send_metrics(self.spool.metrics(), deadline_s, self.spool.acknowledge_metrics)
        tags = self.spool.tags()
        if tags:
            set_tags(self.uri, self.run_id, tags, deadline_s=deadline_s)
            self.spool.acknowledge_tags(tags)

    def _send_metrics(self, records: list[Record], deadline_s: float,
                      acknowledge: Optional[Callable[[int], None]] = None) -> None:
        client = client_for(self.uri)
        for start in range(0, len(records), 500):
            batch = _metrics(records[start:start + 500])
            with_retry(lambda batch=batch: client.log_batch(self.run_id, metrics=batch), deadline_s=deadline_s)
            if acknowledge is not None:
                acknowledge(len(batch))
