"""The Ray Train worker function: resume, train, evaluate, checkpoint, log (rank 0).

`train_loop_per_worker(config)` runs inside every Ray Train worker. `config` carries the run
config as a plain dict plus where to track and cache. On start it resumes from
`ray.train.get_checkpoint()` when Ray Train restarted the worker group after a failure (or the
driver re-ran a run of the same name). Every `checkpoint_every` steps all ranks report; rank 0
attaches the checkpoint and afterwards flushes the buffered metrics to MLflow.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import ray.train
import torch
from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.tracking.client import MetricBuffer, set_tags
from memlayers.platform.tracking.conventions import FIRST_STEP_TAG, progress_tags
from memlayers.platform.train.loop import NonFiniteLoss, RunLoop
from memlayers.platform.train.run_config import run_config_from_dict


def _maybe_fail(step: int, fail_at_step: int | None, marker: Path) -> None:
    """Fault-injection hook: die hard, once per run, at `fail_at_step` (rank 0 only)."""
    if fail_at_step is not None and step == fail_at_step and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        os._exit(17)


def train_loop_per_worker(config: dict) -> None:
    cfg = run_config_from_dict(config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    data = prepare_data(cfg.data, Path(config["cache_dir"]))
    loop = RunLoop(cfg, data, rank=rank, world_size=world_size, device=device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            loop.load(Path(directory))
    metrics_out = MetricBuffer(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if metrics_out is not None and checkpoint is not None:  # a restart replays steps logged before it died
        metrics_out.skip_logged()
    monitor = _system_monitor(config) if rank == 0 else None
    marker = Path(config["workdir"]) / f".fault-injected-{config['run_id']}"
    train = cfg.train
    try:
        while not loop.done:
            if rank == 0:
                _maybe_fail(loop.step + 1, train.fail_at_step, marker)
            try:
                metrics = loop.train_step()
                if loop.step == 1 and metrics_out is not None:
                    _tag_first_step(config)
            except NonFiniteLoss as error:
                if metrics_out is not None:
                    metrics_out.flush()
                ray.train.report({"step": loop.step, "failed": str(error)})
                return
            last = loop.done
            if loop.step % train.log_every == 0 or last:
                metrics["tokens_per_s"] = loop.throughput()
                if metrics_out is not None:
                    metrics_out.add(loop.step, metrics)
                    _show_progress(config, loop.step, metrics)
            if loop.step % train.eval_every == 0 or last:
                evaluation = loop.evaluate()
                metrics.update(evaluation)
                if metrics_out is not None:
                    metrics_out.add(loop.step, evaluation)
            if loop.step % train.checkpoint_every == 0 or last:
                if metrics_out is not None:  # before the checkpoint: a replay after it is skipped, never lost
                    metrics_out.flush()
                _report(loop, metrics)
    finally:
        if monitor is not None:
            monitor.finish()


def _tag_first_step(config: dict) -> None:
    """When the run's first step finished: a cell's start-up is the time up to here."""
    try:
        set_tags(config["tracking_uri"], config["run_id"], {FIRST_STEP_TAG: f"{time.time():.3f}"})
    except Exception:  # a busy store loses the measurement, nothing else
        pass


def _show_progress(config: dict, step: int, metrics: dict) -> None:
    """Rank 0's live progress (a tag the study's progress line reads); best effort, never fatal."""
    try:
        set_tags(config["tracking_uri"], config["run_id"],
                 progress_tags(step, float(metrics["loss"]), float(metrics["tokens_per_s"])))
    except Exception:  # a busy store loses one progress update, nothing else
        pass


def _report(loop: RunLoop, metrics: dict) -> None:
    """Every rank reports; ranks with checkpoint files attach them (Ray merges the directories)."""
    summary = {"step": loop.step, **{k: float(v) for k, v in metrics.items()}}
    with tempfile.TemporaryDirectory() as directory:
        wrote = loop.save(Path(directory))
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(directory) if wrote else None)


def _system_monitor(config: dict):
    if not config.get("system_metrics", True):
        return None
    try:
        # deferred: mlflow is heavy and only this path needs it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(config["run_id"], sampling_interval=5, resume_logging=True,
                                       tracking_uri=config["tracking_uri"])
        monitor.start()
        return monitor
    except Exception:  # system metrics are optional (psutil missing, store refuses)
        return None
