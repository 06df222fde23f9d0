"""A single-worker study cell trained inside its own Tune trial: no Train controller, no worker actor.

Ray Train V2 starts three processes for every fit (its controller, a placement-group cleaner and
the worker), about 8 s of a cell's start-up on 2 cores (README, Performance). A cell with one
worker does not need them: its trial, a Tune actor that successive cells reuse (torch, mlflow
and the extension already imported), runs `worker.drive` itself with a `FolderSession`, whose
checkpoints live in `<storage folder>/checkpoints/<run name>-<run id[:12]>/checkpoint_<step>/`
(`checkpoint_folder.py`: a path, or a bucket on a cluster without a shared disk).

Fault tolerance stays: an exception in the loop restarts it in the same trial from the newest
checkpoint that verifies and loads (`resume.py`: a bad one is set aside, the one before it used),
and a trial whose process died (a killed worker, a lost node) is retried by Tune (the study's
Tuner allows its cells' largest `resources.max_failures`) and resumes the same way; the run
records its attempts (`memlayers.attempt`/`memlayers.attempts` tags), so each cell is restarted
at most its own `resources.max_failures` times and then recorded FAILED.
A run re-launched with the same MLflow run id (a killed controller) resumes from the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from memlayers.platform.cluster.storage import join
from memlayers.platform.tracking.client import client_for, with_retry
from memlayers.platform.tracking.conventions import ATTEMPT_TAG, ATTEMPTS_TAG
from memlayers.platform.train.checkpoint_folder import CheckpointFolder
from memlayers.platform.train.launcher import OpenedRun, TrainResult, open_run
from memlayers.platform.train.resume import Candidate
from memlayers.platform.train.run_config import RunConfig
from memlayers.platform.train.worker import drive


class FolderSession:
    """Rank 0 of 1 on this process's device; checkpoints in a `CheckpointFolder`; the last report kept."""
    rank, world_size = 0, 1

    def __init__(self, folder: CheckpointFolder, device: torch.device) -> None:
        self.folder, self.device = folder, device
        self.metrics: dict[str, float] = {}
        self.checkpoint: Optional[str] = None

    def checkpoints(self) -> Iterator[Candidate]:
        """Committed checkpoints, newest first; `checkpoint` follows the one being tried, so it names
        the one resumed from once `resume_loop` stops asking (None when every one was refused)."""
        for step in reversed(self.folder.steps()):
            self.checkpoint = self.folder.location(step)
            yield Candidate(self.checkpoint, lambda step=step: self.folder.open(step),
                            lambda reason, step=step: self.folder.set_aside(step, reason))
        self.checkpoint = None

    def report(self, metrics: dict[str, float], directory: Optional[Path]) -> None:
        self.metrics = dict(metrics)
        if directory is not None:
            self.checkpoint = self.folder.add(int(metrics["step"]), directory)


def device_for(cfg: RunConfig) -> torch.device:
    """The trial's GPU (Ray made it the only visible one) when the cell asks for one, else the CPU."""
    use_gpu = cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    return torch.device("cuda") if use_gpu else torch.device("cpu")


def checkpoint_folder(run: OpenedRun) -> CheckpointFolder:
    return CheckpointFolder(join(run.root, "checkpoints", f"{run.name}-{run.run_id[:12]}"))


def earlier_attempts(uri: str, run_id: Optional[str], job: str) -> int:
    """How many times this job's trials already started run `run_id` (0 for a new run or job)."""
    if run_id is None:
        return 0
    tags = with_retry(lambda: client_for(uri).get_run(run_id)).data.tags
    return int(tags.get(ATTEMPTS_TAG, 0)) if tags.get(ATTEMPT_TAG) == job else 0


def run_in_trial(cfg: RunConfig, *, workdir: Path, job: str) -> TrainResult:
    """Train `cfg` (one worker) in this process, as the study job `job`; see the module docstring."""
    allowed = cfg.resources.max_failures + 1
    uri = cfg.tracking.uri
    attempts = earlier_attempts(uri, cfg.tracking.run_id, job) if uri else 0
    while True:
        attempts += 1
        cfg.tracking.tags.update({ATTEMPT_TAG: job, ATTEMPTS_TAG: str(attempts)})
        try:  # the tracking layer waits out a short outage; a longer one costs this attempt
            run = open_run(cfg, workdir)
        except Exception:
            if attempts >= allowed or cfg.tracking.run_id is None:
                raise
            continue
        cfg.tracking.run_id = run.run_id
        if attempts > allowed:  # the earlier attempts' processes died
            return run.fail(f"the cell's trial process died {attempts - 1} times "
                            f"(resources.max_failures={cfg.resources.max_failures}); see the Ray logs")
        session = FolderSession(checkpoint_folder(run), device_for(cfg))
        try:
            drive(run.loop_config(max(1, int(cfg.resources.cpus_per_worker))), session, run.data)
        except Exception as error:  # the loop failed: restart it from the newest checkpoint, if allowed
            if attempts >= allowed:
                return run.fail(f"{type(error).__name__}: {error}".splitlines()[0])
            continue
        return run.finish(session.metrics, session.checkpoint)
