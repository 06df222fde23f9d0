"""MLflow tracking of training runs: one run per training run, logged from one process.

The driver creates the run (or continues an existing one: a study resuming a cell, a restarted
worker group), logs the flattened config as params and the accounting as tags; rank 0 of the
workers logs metrics. Metrics are buffered and flushed right after each checkpoint, so a worker
that dies replays exactly the steps after the last checkpoint and every step is logged once.
Writes retry briefly on SQLite's "database is locked".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from memlayers.config_schema import flatten
from memlayers.platform.tracking.conventions import PARENT_TAG, RUN_NAME_TAG, store_exists

T = TypeVar("T")


def client_for(uri: str):
    from mlflow.tracking import MlflowClient  # deferred: mlflow is heavy and only this path needs it
    return MlflowClient(tracking_uri=uri)


def search_all_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every run of the experiment matching `filter_string`, across result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
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
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else search_all_runs(client, found.experiment_id, filter_string)


def with_retry(call: Callable[[], T], attempts: int = 20, delay: float = 0.25) -> T:
    """Retry `call` while SQLite reports a locked database."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(delay * (1 + attempt))
    raise AssertionError("unreachable")


def ensure_experiment(uri: str, name: str, artifact_root: Path | str | None = None) -> str:
    """The id of experiment `name`, created (with artifacts under `artifact_root`: a local folder or
    a URI; None for the store's default) if missing."""
    client = client_for(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root.resolve().as_uri() if isinstance(artifact_root, Path) else artifact_root
    try:
        return with_retry(lambda: client.create_experiment(name, artifact_location=location))
    except Exception:
        experiment = client.get_experiment_by_name(name)  # created concurrently
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
    existing = client.get_run(run_id).data.params
    flat = {k: str(v)[:6000] for k, v in flatten(params).items() if k not in existing}
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), 100):
        with_retry(lambda: client.log_batch(run_id, params=items[start:start + 100]))


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag  # deferred: mlflow is heavy and only this path needs it
    client = client_for(uri)
    with_retry(lambda: client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))


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
        with_retry(lambda: client.log_batch(run_id, metrics=batch[start:start + 500]))


class MetricBuffer:
    """Step metrics held until `flush` (right before a checkpoint). A worker restarted from a
    checkpoint calls `skip_logged`: the steps it replays that were logged before it died are
    dropped, so every step is logged exactly once."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.logged_through = -1        # steps up to this one are in the store already

    def skip_logged(self) -> None:
        """Read the newest training step the run has logged; later `add`s up to it are dropped."""
        client = client_for(self.uri)
        keys = [k for k in client.get_run(self.run_id).data.metrics if not k.startswith("system/")]  # own steps
        steps = [m.step for key in keys for m in client.get_metric_history(self.run_id, key)]
        self.logged_through = max(steps, default=-1)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.logged_through:
            self.pending.append((step, dict(metrics)))

    def flush(self) -> None:
        if not self.pending:
            return
        from mlflow.entities import Metric  # deferred: mlflow is heavy and only this path needs it
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for step, values in self.pending for k, v in values.items()]
        client = client_for(self.uri)
        for start in range(0, len(metrics), 500):
            with_retry(lambda: client.log_batch(self.run_id, metrics=metrics[start:start + 500]))
        self.pending.clear()
