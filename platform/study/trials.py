"""Cells as Ray Tune trials: one function trainable per run config; where the cell trains depends
on its `resources.runner`.

- in the trial (`train/in_trial.py`; `auto` for one worker): the trial, a Tune actor reused by
  successive cells, runs the training loop itself and holds the cell's CPUs/GPU;
- on Ray Train (`train/launcher.run_training`; `auto` for more workers): Ray 2.60's Train V2
  cannot be wrapped by `Tuner(TorchTrainer)`, so the trial builds and fits its own TorchTrainer,
  holds no CPU and runs on the head node (its workers hold the CPUs/GPUs), so that a worker node
  that dies takes no trial (nor its Train controller, which Ray places beside the trial).

Every job carries a fresh id (`memlayers.attempt` tag on its run): a trial that Tune retries
after its process died finds the run its first attempt created and continues it, so a cell keeps
one run. At most as many trials run at once as the cluster's CPUs/GPUs fit.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import ray
import ray.tune

from memlayers.platform.cluster.storage import join
from memlayers.platform.tracking.client import search_runs
from memlayers.platform.tracking.conventions import ATTEMPT_TAG, STARTED_TAG
from memlayers.platform.train.run_config import RunConfig, run_config_from_dict

DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What a cell's trial holds: the worker's CPUs/GPU when it trains in the trial, else the
    driver's share on the head node."""
    r = cfg.resources
    if not r.in_trial():
        return dict(DRIVER_RESOURCES)
    return {"cpu": r.cpus_per_worker, **({"gpu": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}


def _job_run_id(cfg: RunConfig, job: str) -> str | None:
    """The run this job's earlier attempt created (Tune retried the trial), if any."""
    if cfg.tracking.run_id is not None or not cfg.tracking.uri:
        return cfg.tracking.run_id
    found = search_runs(cfg.tracking.uri, cfg.tracking.experiment or cfg.name, f"tags.`{ATTEMPT_TAG}` = '{job}'")
    return found[0].info.run_id if found else None


def _cell_trainable(config: dict) -> None:
    """One Tune trial: train one run config in the trial or on Ray Train, and report how it ended."""
    # deferred: each path imports its trainer only when a trial takes it
    from memlayers.platform.train.in_trial import run_in_trial
    from memlayers.platform.train.launcher import run_training

    job = config["job"]
    try:
        cfg = run_config_from_dict(job["run"])
        cfg.tracking.tags[STARTED_TAG] = f"{time.time():.3f}"
        cfg.tracking.run_id = _job_run_id(cfg, job["id"])
        if cfg.resources.in_trial():
            result = run_in_trial(cfg, workdir=Path(job["workdir"]), job=job["id"])
        else:
            cfg.tracking.tags[ATTEMPT_TAG] = job["id"]
            result = run_training(cfg, workdir=Path(job["workdir"]))
        report = {**{k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))},
                  "run_id": result.run_id, "status": result.status, "error": result.error or ""}
    except Exception as error:  # a crash outside the training loop: recorded by the controller
        report = {"run_id": "", "status": "FAILED", "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    ray.tune.report({**report, "key": job["key"]})


def max_concurrent(configs: list, resources: dict[str, float]) -> int:
    """How many of these runs fit on the cluster at once (at least one)."""
    fits = []
    for cfg in configs:
        r = cfg.resources
        fits.append(int(resources.get("CPU", 1) // max(r.workers * r.cpus_per_worker, 1e-9)))
        if r.gpus_per_worker > 0:
            fits.append(int(resources.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    return max(1, min(fits or [1]))


def trial_retries(configs: list) -> int:
    """Tune's retries of a trial whose process died: enough for the cell that allows the most
    (cells training in their trial count their own attempts; Ray Train runs restart themselves)."""
    return max([cfg.resources.max_failures for cfg in configs if cfg.resources.in_trial()] or [0])


def run_jobs(jobs: dict, *, workdir: Path, label: str, storage_root: str | None = None) -> dict[str, dict]:
    """Run `jobs` (key -> RunConfig) as Ray Tune trials; key -> the trial's final report. Tune keeps
    its state in `<storage_root>/tune` (default: the workdir)."""
    if not jobs:
        return {}
    configs = list(jobs.values())
    concurrency = max_concurrent(configs, ray.cluster_resources())
    space = [{"key": key, "id": uuid.uuid4().hex, "run": cfg.to_dict(), "workdir": str(workdir),
              "resources": trial_resources(cfg)} for key, cfg in jobs.items()]
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_cell_trainable, lambda config: config["job"]["resources"]),
        param_space={"job": ray.tune.grid_search(space)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True,
                                        trial_name_creator=lambda t: f"{label}-{t.trial_id}",
                                        trial_dirname_creator=lambda t: f"{label}-{t.trial_id}"),
        run_config=ray.tune.RunConfig(name=f"{label}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=join(storage_root or str(workdir), "tune"), verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=trial_retries(configs))),
    )
    grid = tuner.fit()
    results = {}
    for i in range(len(grid)):
        res = grid[i]
        key = (res.config or {}).get("job", {}).get("key")
        metrics = dict(res.metrics or {})
        if res.error is not None and not metrics.get("status"):
            metrics.update(status="FAILED", error=f"{type(res.error).__name__}: {res.error}".splitlines()[0][:500])
        if key is not None:
            results[key] = metrics
    return results
