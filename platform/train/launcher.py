"""`run_training`: one training run on Ray Train, tracked as one MLflow run.

The driver prepares the data once into token shards (`<storage>/data/`, or the workdir's cache
without storage; data/build.py), as far as the run needs it, and workers read those shards
through a bounded local cache; it plans the run (steps, tokens,
FLOPs from the accounting), creates or continues the MLflow run, and fits a `TorchTrainer`
whose workers run `worker.train_loop_per_worker`. Ray Train restarts the worker group on a
failure (`resources.max_failures`) and the workers resume from the latest checkpoint. A run
re-launched with the same MLflow run id resumes too: the Ray Train run is named after it.
Ray must be initialised by the caller (`memlayers train` and the study controller do it).
`open_run` (data, plan, MLflow run) and `OpenedRun.finish` are shared with a study cell trained
inside its Tune trial (`train/in_trial.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from memlayers.models.presets import memory_size_name
from memlayers.platform.cluster.storage import join, location_of, study_folder
from memlayers.platform.data.build import run_need
from memlayers.platform.data.prepare import PreparedData, open_prepared
from memlayers.platform.data.tracked import prepare_tracked
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import (
    CHECKPOINT_TAG,
    FAILURE_TAG,
    ROLE_TAG,
    artifact_location,
    cell_run_name,
    sqlite_uri,
)
from memlayers.platform.tracking.study_ref import default_workdir
from memlayers.platform.train.loop import Plan, plan_run
from memlayers.platform.train.run_config import RunConfig

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@dataclass
class TrainResult:
    run_id: str
    status: str                       # FINISHED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    error: str | None = None


def run_name(cfg: RunConfig, plan: Plan) -> str:
    """`memory_plus-373m-1m-seed0`, `moe-nano-8x-seed1`, `dense-tiny-seed0`."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    size = plan.model.memory_size
    variant = memory_size_name(size) if size else f"{plan.model.moe.experts}x" if plan.model.moe else None
    return cell_run_name(cfg.model.family, cfg.model.base, variant, None, cfg.train.seed)


def run_tags(cfg: RunConfig, plan: Plan) -> dict[str, str]:
    acc = plan.accounting
    return {
        "family": cfg.model.family, "base": cfg.model.base,
        "memory_slots": str(plan.model.memory_size),
        "experts": str(plan.model.moe.experts if plan.model.moe else 0),
        "train_flops": f"{plan.train_flops:.6g}", "train_tokens": str(plan.tokens), "steps": str(plan.steps),
        "total_params": str(acc.total_params), "active_params": str(acc.active_params),
        "memory_value_params": str(acc.memory_value_params),
        "train_flops_per_token": str(acc.train_flops_per_token),
        ROLE_TAG: cfg.tracking.tags.get(ROLE_TAG, "run"),
    }


def resolve_workdir(cfg: RunConfig, workdir: Path | None) -> Path:
    return Path(workdir or cfg.workdir or default_workdir(cfg.name)).resolve()


def data_root(cfg: RunConfig, workdir: Path) -> str:
    """Where prepared sets live: `<storage>/data` (every node and study reads them), else the workdir's cache."""
    return join(cfg.storage, "data") if cfg.storage else str(workdir / "data-cache")


def data_need(cfg: RunConfig, vocab_size: int) -> int | None:
    """The training tokens the run reads (None: the whole corpus); see `build.run_need`."""
    return run_need(cfg.data.source, plan_run(cfg, vocab_size).tokens)


def storage_root(cfg: RunConfig, workdir: Path) -> str:
    """The run's folder for durable files: `<storage>/<experiment or name>`, or its workdir."""
    return study_folder(cfg.storage, cfg.tracking.experiment or cfg.name, workdir)


@dataclass
class OpenedRun:
    """A run ready to train: its data prepared, its plan, and its MLflow run created or continued."""
    cfg: RunConfig
    workdir: Path
    uri: str                          # the tracking URI
    cache_dir: Path
    data_root: str                    # where the prepared set lives
    plan: Plan
    name: str
    root: str                         # the storage folder of durable files
    run_id: str
    data: PreparedData

    def loop_config(self, threads: int) -> dict:
        """What the training loop needs besides the run config (`worker.drive`)."""
        return {"run": self.cfg.to_dict(), "run_id": self.run_id, "tracking_uri": self.uri,
                "cache_dir": str(self.cache_dir), "workdir": str(self.workdir), "threads": threads,
                "data_root": self.data_root, "data_need": data_need(self.cfg, self.data.tokenizer.vocab_size),
                "system_metrics": self.cfg.tracking.system_metrics}

    def fail(self, reason: str) -> TrainResult:
        tracking.set_tags(self.uri, self.run_id, {FAILURE_TAG: reason[:500]})
        tracking.set_status(self.uri, self.run_id, "FAILED")
        return TrainResult(self.run_id, "FAILED", error=reason[:500])

    def finish(self, metrics: dict, checkpoint: str | None) -> TrainResult:
        """Record how the loop ended (its last report): FINISHED, or FAILED with the loop's reason."""
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if checkpoint:
            tracking.set_tags(self.uri, self.run_id, {CHECKPOINT_TAG: checkpoint})
        failed = metrics.get("failed")
        if failed:
            result = self.fail(str(failed))
            return TrainResult(self.run_id, "FAILED", numbers, checkpoint, result.error)
        tracking.set_status(self.uri, self.run_id, "FINISHED")
        return TrainResult(self.run_id, "FINISHED", numbers, checkpoint)


def open_run(cfg: RunConfig, workdir: Path | None = None) -> OpenedRun:
    """Prepare the data the run needs (logged as a `data` run when shards are written; workers then
    read the shards), plan the run and create its MLflow run, or continue `cfg.tracking.run_id`;
    the run's tags and params are (re)logged."""
    workdir = resolve_workdir(cfg, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    uri = cfg.tracking.uri or sqlite_uri(workdir)
    cache_dir = workdir / "data-cache"
    root = storage_root(cfg, workdir)
    experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment or cfg.name, artifact_location(uri, root))
    prepared_in = data_root(cfg, workdir)
    manifest = prepare_tracked(cfg.data, prepared_in, lambda vocab: data_need(cfg, vocab), uri=uri,
                               experiment_id=experiment_id, study=cfg.tracking.tags.get("study"))
    data = open_prepared(cfg.data, prepared_in, data_need(cfg, manifest["vocab_size"]), cache_dir, manifest)
    plan = plan_run(cfg, data.tokenizer.vocab_size)
    name = run_name(cfg, plan)
    run_id = cfg.tracking.run_id
    if run_id is None:
        run_id = tracking.create_run(uri, experiment_id, name, {**run_tags(cfg, plan), **cfg.tracking.tags},
                                     cfg.tracking.parent_run_id)
    else:
        tracking.set_status(uri, run_id, "RUNNING")
        tracking.set_tags(uri, run_id, {**run_tags(cfg, plan), **cfg.tracking.tags})
    tracking.log_params(uri, run_id, cfg.to_dict())
    return OpenedRun(cfg, workdir, uri, cache_dir, prepared_in, plan, name, root, run_id, data)


def run_training(cfg: RunConfig, *, workdir: Path | None = None, threads_per_worker: int | None = None) -> TrainResult:
    """Train `cfg` on the current Ray cluster; returns the MLflow run id, status and final metrics."""
    import ray.train  # deferred: ray is heavy and only this path needs it
    from ray.train.torch import TorchConfig, TorchTrainer  # deferred: ray is heavy and only this path needs it

    from memlayers.platform.train.worker import train_loop_per_worker  # deferred: the worker brings ray.train

    run = open_run(cfg, workdir)
    use_gpu = cfg.resources.gpus_per_worker > 0
    resources = {"CPU": cfg.resources.cpus_per_worker, **({"GPU": cfg.resources.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=run.loop_config(threads_per_worker or max(1, int(cfg.resources.cpus_per_worker))),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.resources.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{run.name}-{run.run_id[:12]}", storage_path=join(run.root, "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as error:  # the worker group failed more than max_failures times
        return run.fail(f"{type(error).__name__}: {error}".splitlines()[0])
    checkpoint = result.checkpoint  # a bucket's checkpoint as a URI: `Checkpoint.path` alone drops the scheme
    return run.finish(dict(result.metrics or {}),
                      location_of(checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None)
