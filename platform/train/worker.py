"""The training loop's driver: resume, train, evaluate, checkpoint, log (rank 0).

`drive(config, session)` runs one run's steps wherever the run lives: inside every Ray Train
worker (`train_loop_per_worker`, with Ray Train's session) or inside a study cell's Tune trial
(`in_trial.py`, with a checkpoint folder of its own). `config` carries the run config as a plain
dict plus where to track and cache (`launcher.OpenedRun.loop_config`). On start it resumes from
the session's latest checkpoint (Ray Train restarted the worker group after a failure, Tune
retried the trial, or the driver re-ran a run of the same MLflow run id). Every
`checkpoint_every` steps all ranks report; rank 0 attaches the checkpoint and, before it,
flushes the buffered metrics to MLflow, so a replay after a restart is skipped, never lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from memlayers.platform.data.prepare import PreparedData, open_prepared
from memlayers.platform.data.shard_loader import ShardStream
from memlayers.platform.tracking.client import MetricBuffer
from memlayers.platform.tracking.conventions import FIRST_STEP_TAG, progress_tags, set_aside_tags
from memlayers.platform.train.loop import NonFiniteLoss, RunLoop
from memlayers.platform.train.resume import Candidate, all_ranks_agree, resume_loop, sibling_candidates
from memlayers.platform.train.run_config import RunConfig, run_config_from_dict

DATA_CACHE_TAG = "memlayers.data_cache"  # rank 0's shard cache at the run's end: bound, peak, downloads (JSON)


class Session(Protocol):
    """Where a running loop lives: its rank, device, latest checkpoint and how it reports."""
    rank: int
    world_size: int
    device: torch.device

    def checkpoints(self) -> Iterator[Candidate]:
        """The run's checkpoints, newest first (`resume.py` verifies, loads or sets them aside)."""

    def report(self, metrics: dict[str, float], directory: Optional[Path]) -> None:
        """Report `metrics`, with the checkpoint written into `directory` (None: this rank wrote none)."""


class RayTrainSession:
    """Ray Train's: the worker group's rank and device, checkpoints kept by Ray Train in storage."""

    def __init__(self) -> None:
        import ray.train  # deferred: only a Ray Train worker needs it
        import ray.train.torch  # deferred: only a Ray Train worker needs it
        self.train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def checkpoints(self) -> Iterator[Candidate]:
        checkpoint = self.train.get_checkpoint()
        if checkpoint is None:
            return iter(())
        fs = checkpoint.filesystem
        return sibling_candidates(fs, checkpoint.path, lambda path: _as_directory(self.train.Checkpoint(path, fs)))

    def report(self, metrics: dict[str, float], directory: Optional[Path]) -> None:
        self.train.report(metrics, checkpoint=self.train.Checkpoint.from_directory(directory) if directory else None)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker function."""
    drive(config, RayTrainSession())


def _maybe_fail(step: int, fail_at_step: int | None, marker: Path) -> None:
    """Fault-injection hook: die hard, once per run, at `fail_at_step` (rank 0 only)."""
    if fail_at_step is not None and step == fail_at_step and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        os._exit(17)


def loop_class(cfg: RunConfig) -> type[RunLoop]:
    """The loop of a run: a finetuning cell's starts from its source checkpoint (`platform/finetune/loop.py`)."""
    if cfg.finetune is None:
        return RunLoop
    from memlayers.platform.finetune.loop import FinetuneLoop  # deferred: the finetune package imports this layer
    return FinetuneLoop


def drive(config: dict, session: Session, data: Optional[PreparedData] = None) -> None:
    """Train the run of `config` to its last step under `session` (see the module docstring);
    `data`: the run's prepared data when the caller has it, else opened from its shards."""
    cfg = run_config_from_dict(config["run"])
    rank = session.rank
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    data = data or open_prepared(cfg.data, config["data_root"], config["data_need"], Path(config["cache_dir"]))
    metrics_out = MetricBuffer(config["tracking_uri"], config["run_id"], Path(config["workdir"])) if rank == 0 else None
    build = loop_class(cfg)
    loop, resumed_from = resume_loop(
        session.checkpoints(), lambda: build(cfg, data, rank=rank, world_size=session.world_size,
                                             device=session.device),
        rank, lambda where, why: _log_set_aside(metrics_out, where, why),
        lambda ok: all_ranks_agree(ok, session.device) if session.world_size > 1 and dist.is_initialized() else ok)
    resumed = resumed_from is not None
    if metrics_out is not None and resumed:  # a restart replays steps logged before it died
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
                    _tag_first_step(metrics_out)
            except NonFiniteLoss as error:
                if metrics_out is not None:
                    metrics_out.drain()
                session.report({"step": loop.step, "failed": str(error)}, None)
                return
            last = loop.done
            if loop.step % train.log_every == 0 or last:
                metrics["tokens_per_s"] = loop.throughput()
                if metrics_out is not None:
                    metrics_out.add(loop.step, metrics)
                    _show_progress(metrics_out, loop.step, metrics)
            if loop.step % train.eval_every == 0 or last:
                evaluation = loop.evaluate()
                metrics.update(evaluation)
                if metrics_out is not None:
                    metrics_out.add(loop.step, evaluation)
            if loop.step % train.checkpoint_every == 0 or last:
                if metrics_out is not None:  # before the checkpoint: a replay after it is skipped, never lost
                    metrics_out.flush()
                _report(loop, metrics, session)
        if metrics_out is not None:  # what an outage held back is sent before the run is recorded finished
            _tag_data_cache(metrics_out, data)
            metrics_out.drain()
    finally:
        if monitor is not None:
            monitor.finish()


def _tag_data_cache(metrics_out: MetricBuffer, data: PreparedData) -> None:
    """What the shard cache held at most, beside its bound and the stream's size (best effort)."""
    if not isinstance(data.train_ids, ShardStream):
        return
    cache = data.train_ids.cache
    record = {"peak_bytes": cache.peak_bytes, "limit_bytes": cache.limit_bytes, "downloads": cache.downloads,
              "set_bytes": sum(cache.sizes.values()), "stream_tokens": len(data.train_ids)}
    try:
        metrics_out.set_tags({DATA_CACHE_TAG: json.dumps(record)})
    except Exception:  # a busy store loses the measurement, nothing else
        pass


@contextlib.contextmanager
def _as_directory(checkpoint) -> Iterator[Path]:
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def _log_set_aside(metrics_out: Optional[MetricBuffer], where: str, why: str) -> None:
    """A checkpoint that failed to verify or load: said in the worker's log and, from rank 0, on the run."""
    print(f"checkpoint {where} set aside: {why}", flush=True)
    if metrics_out is not None:
        metrics_out.set_tags(set_aside_tags(where, why))


def _tag_first_step(metrics_out: MetricBuffer) -> None:
    """When the run's first step finished: a cell's start-up is the time up to here."""
    try:
        metrics_out.set_tags({FIRST_STEP_TAG: f"{time.time():.3f}"})
    except Exception:  # a busy store loses the measurement, nothing else
        pass


def _show_progress(metrics_out: MetricBuffer, step: int, metrics: dict) -> None:
    """Rank 0's live progress (a tag the study's progress line reads); best effort, never fatal."""
    try:
        metrics_out.set_tags(progress_tags(step, float(metrics["loss"]), float(metrics["tokens_per_s"])))
    except Exception:  # a busy store loses one progress update, nothing else
        pass


def _report(loop: RunLoop, metrics: dict, session: Session) -> None:
    """Every rank reports; ranks with checkpoint files attach them (Ray merges the directories)."""
    summary = {"step": loop.step, **{k: float(v) for k, v in metrics.items()}}
    with tempfile.TemporaryDirectory() as directory:
        wrote = loop.save(Path(directory))
        session.report(summary, Path(directory) if wrote else None)


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
