"""A preparation recorded in MLflow: one run of role `data` in the study's (or run's) experiment.

`prepare_tracked` calls `prepare_set` and, once it writes its first shard, opens the MLflow run
`data-<fingerprint>` (tags `memlayers.role: data`, `study`, `fingerprint`), logs the progress
records (shards written, tokens, tokens/s, ETA) as metrics, and at the end the manifest as an
artifact (`manifest.json`) and its totals as params. A set already prepared logs nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Optional

from memlayers.platform.data.build import Need, describe, prepare_set
from memlayers.platform.data.config import DataConfig
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import FAILURE_TAG, ROLE_TAG, role_filter

DATA_ROLE = "data"


class _DataRun:
    def __init__(self, uri: str, experiment_id: str, study: Optional[str]) -> None:
        self.uri, self.experiment_id, self.study = uri, experiment_id, study
        self.run_id: Optional[str] = None
        self.step = 0

    def record(self, key: str, values: dict) -> None:
        if self.run_id is None:
            tags = {ROLE_TAG: DATA_ROLE, "fingerprint": key, **({"study": self.study} if self.study else {})}
            self.run_id = tracking.create_run(self.uri, self.experiment_id, f"data-{key}", tags)
        self.step += 1
        tracking.log_metrics(self.uri, self.run_id, values, step=self.step)

    def finish(self, manifest: dict) -> None:
        if self.run_id is None:
            return
        tracking.log_params(self.uri, self.run_id, describe(manifest))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "manifest.json"
            path.write_text(json.dumps(manifest, indent=1))
            tracking.client_for(self.uri).log_artifact(self.run_id, str(path))
        tracking.set_status(self.uri, self.run_id, "FINISHED")

    def fail(self, reason: str) -> None:
        if self.run_id is not None:
            tracking.set_tags(self.uri, self.run_id, {FAILURE_TAG: reason[:500]})
            tracking.set_status(self.uri, self.run_id, "FAILED")


def prepare_tracked(cfg: DataConfig, data_root: str, need: Need, *, uri: str, experiment_id: str,
                    study: Optional[str] = None, out: Callable[[str], None] = print, always: bool = False) -> dict:
    """`prepare_set` with its MLflow run (see the module docstring); returns the manifest. `always`:
    record the run (with the manifest) even when the set was already prepared, e.g. once per study."""
    run = _DataRun(uri, experiment_id, study)
    try:
        manifest = prepare_set(cfg, data_root, need, out=out, progress=run.record)
    except BaseException as error:
        run.fail(f"{type(error).__name__}: {error}".splitlines()[0])
        raise
    if always and run.run_id is None:
        run.record(manifest["fingerprint"], {"shards_written": 0, "tokens": 0})
    run.finish(manifest)
    return manifest


def data_status(uri: str, experiment: str) -> str:
    """One line on the data of the study (or run) `experiment`, from its latest `data` run."""
    runs = tracking.search_runs(uri, experiment, role_filter(DATA_ROLE))
    if not runs:
        return "data: not prepared yet"
    run = max(runs, key=lambda r: r.info.start_time)
    params, metrics = run.data.params, run.data.metrics
    if run.info.status == "RUNNING":
        eta = f", ETA {metrics['eta_s']:.0f} s" if "eta_s" in metrics else ""
        return f"data: preparing {run.data.tags.get('fingerprint', '?')}: {metrics.get('shards_written', 0):.0f} " \
               f"shards written{eta}"
    if run.info.status == "FAILED":
        return f"data: preparation failed: {run.data.tags.get(FAILURE_TAG, '?')}"
    return f"data: prepared {params.get('fingerprint', '?')}: {params.get('shards', '?')} shards, " \
           f"{int(params.get('train_tokens', 0)):,} training tokens" + \
           ("" if params.get("complete") == "True" else " (as many as the study needs)")
