"""Cells as Ray Tune trials: one function trainable per run config, each fitting a TorchTrainer.

Ray 2.60's Train V2 cannot be wrapped by `Tuner(TorchTrainer)`; the pattern is a Tune function
trainable that builds and fits its own TorchTrainer (`train/launcher.run_training`) and reports
how it ended. At most as many trials run at once as the cluster's CPUs/GPUs fit.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray
import ray.tune
from memlayers.platform.cluster.storage import join
from memlayers.platform.tracking.conventions import STARTED_TAG
from memlayers.platform.train.launcher import run_training
from memlayers.platform.train.run_config import run_config_from_dict

# A trial only drives its TorchTrainer (whose workers hold the CPUs/GPUs): no CPU, some memory, and
# it runs on the head node, so that a worker node that dies takes no trial (nor its Train controller,
# which Ray places beside the trial) with it: Ray Train then restarts the workers elsewhere.
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}


def _cell_trainable(config: dict) -> None:
    """One Tune trial: train one run config with `run_training` and report how it ended."""
    job = config["job"]
    try:
        cfg = run_config_from_dict(job["run"])
        cfg.tracking.tags[STARTED_TAG] = f"{time.time():.3f}"
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


def run_jobs(jobs: dict, *, workdir: Path, label: str, storage_root: str | None = None) -> dict[str, dict]:
    """Run `jobs` (key -> RunConfig) as Ray Tune trials; key -> the trial's final report. Tune keeps
    its state in `<storage_root>/tune` (default: the workdir)."""
    if not jobs:
        return {}
    concurrency = max_concurrent(list(jobs.values()), ray.cluster_resources())
    space = [{"key": key, "run": cfg.to_dict(), "workdir": str(workdir)} for key, cfg in jobs.items()]
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_cell_trainable, TRIAL_RESOURCES),
        param_space={"job": ray.tune.grid_search(space)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency,
                                        trial_name_creator=lambda t: f"{label}-{t.trial_id}",
                                        trial_dirname_creator=lambda t: f"{label}-{t.trial_id}"),
        run_config=ray.tune.RunConfig(name=f"{label}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=join(storage_root or str(workdir), "tune"), verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
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
