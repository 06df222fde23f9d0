"""What `memlayers eval TARGET` evaluates: checkpoint folders, each with the MLflow run it belongs to.

TARGET is, in this order: a checkpoint folder (no run: nothing is logged); a study file
(`*.yaml`) or the name of a study under ./runs/NAME, meaning the final checkpoint of every
finished cell; or an MLflow run id (its final checkpoint, tag `checkpoint`), looked up at
`--tracking-uri` (default: $MLFLOW_TRACKING_URI). Anything else is an EvalInputError naming it.

A run's checkpoint is a local path or a storage URI (`s3://bucket/.../checkpoint_00000006` of a study
with bucket storage); a target keeps it as written and `Target.checkpoint` is the local folder to load,
a remote one downloaded (once per process and URI) where the target is evaluated: on whichever node
the evaluation task runs.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memlayers.platform.cluster import storage
from memlayers.platform.eval.tasks import EvalInputError
from memlayers.platform.tracking.cell_runs import cell_runs, latest
from memlayers.platform.tracking.client import client_for
from memlayers.platform.tracking.conventions import CHECKPOINT_TAG, RUN_NAME_TAG, store_exists
from memlayers.platform.tracking.study_ref import resolve_study

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Target:
    location: str                       # the checkpoint folder: a local path or a storage URI
    run_id: str | None = None           # the MLflow run the scores are logged to (None: not logged)
    tracking_uri: str | None = None
    name: str = ""                      # the run's name, for tables
    logged: frozenset[str] = frozenset()  # metric keys the run already has

    @property
    def checkpoint(self) -> Path:
        """The checkpoint as a local folder (a remote one is downloaded on first use)."""
        local = storage.local_path(self.location)
        return local if local is not None else local_copy(self.location)


_COPIES: dict[str, tempfile.TemporaryDirectory] = {}  # uri -> this process's copy, removed when it exits


def local_copy(uri: str) -> Path:
    """The remote checkpoint folder `uri`, downloaded once per process into a temporary folder (not
    shared between processes: a replayed step may replace a checkpoint under the same URI)."""
    if uri not in _COPIES:
        files = storage.list_files(uri)
        if not files:
            raise EvalInputError(f"checkpoint {uri}: no files there (deleted, or not readable with this "
                                 "machine's storage credentials)")
        copy = tempfile.TemporaryDirectory(prefix="memlayers-checkpoint-")
        for relative in files:
            storage.download(storage.join(uri, *relative.split("/")), Path(copy.name).joinpath(*relative.split("/")))
        _COPIES[uri] = copy
    return Path(_COPIES[uri].name)


def _checkpoint_of(run_id: str, tags: dict, where: str) -> str:
    location = tags.get(CHECKPOINT_TAG)
    if not location:
        raise EvalInputError(f"{where}: run {run_id} has no final checkpoint (tag {CHECKPOINT_TAG!r})")
    return location


def study_targets(ref: str, tracking_uri: str | None = None) -> list[Target]:
    """The final checkpoint of every finished cell of a study (file or name)."""
    try:
        study = resolve_study(ref, tracking_uri)
    except (FileNotFoundError, ValueError) as error:
        raise EvalInputError(f"TARGET {ref}: {error}") from None
    if not store_exists(study.tracking_uri):
        raise EvalInputError(f"TARGET {ref}: study {study.name} has no MLflow store at {study.tracking_uri}")
    targets = cell_targets(study.name, study.tracking_uri)
    if not targets:
        raise EvalInputError(f"TARGET {ref}: study {study.name} has no finished cell")
    return targets


def cell_targets(study: str, tracking_uri: str) -> list[Target]:
    """The final checkpoint of every finished cell of study `study`, by run name."""
    targets = []
    for runs in cell_runs(tracking_uri, study).values():
        run = latest(runs)
        if run is not None and run.status == "FINISHED":
            targets.append(Target(_checkpoint_of(run.run_id, run.tags, f"study {study}"), run.run_id,
                                  tracking_uri, run.name, frozenset(run.metrics)))
    return sorted(targets, key=lambda t: t.name)


def run_target(run_id: str, tracking_uri: str | None) -> Target:
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise EvalInputError(f"TARGET {run_id}: an MLflow run id needs --tracking-uri (or MLFLOW_TRACKING_URI)")
    if not store_exists(uri):
        raise EvalInputError(f"--tracking-uri {uri}: no such MLflow store")
    try:
        run = client_for(uri).get_run(run_id)
    except Exception as error:  # MlflowException: RESOURCE_DOES_NOT_EXIST
        raise EvalInputError(f"TARGET {run_id}: no such MLflow run at {uri} ({type(error).__name__})") from None
    tags = run.data.tags
    return Target(_checkpoint_of(run_id, tags, f"TARGET {run_id}"), run_id, uri, tags.get(RUN_NAME_TAG, run_id),
                  frozenset(run.data.metrics))


def resolve_targets(target: str, tracking_uri: str | None = None, root: Path | None = None) -> list[Target]:
    """The checkpoints TARGET names (see the module docstring)."""
    path = Path(target)
    if path.is_dir() and (path / "meta.json").is_file():
        return [Target(str(path.resolve()), name=path.name)]
    if path.suffix in (".yaml", ".yml"):
        return study_targets(target, tracking_uri)
    if "/" not in target and (Path(root or "runs") / target / "mlflow.db").is_file():
        return study_targets(target, tracking_uri)
    if RUN_ID.match(target):
        return [run_target(target, tracking_uri)]
    raise EvalInputError(f"TARGET {target}: not a checkpoint folder, a study file or name (./runs/NAME), "
                         "or an MLflow run id")
