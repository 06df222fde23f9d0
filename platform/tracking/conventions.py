"""Every MLflow convention of memlayers in one place: tags, roles, run names, URIs, filters.

A study lives in the MLflow experiment named after it. Its runs carry the tag `memlayers.role`:
`study` for the one parent run, `cell` for a grid cell's run (tags `study`, `cell`, `family`,
`base`, ...), `tuning` for a learning-rate trial, `run` for a plain `memlayers train` run.
Children point at the parent with MLflow's own `mlflow.parentRunId`. The embedded default store
is `sqlite:///<workdir>/mlflow.db` with artifacts in `<workdir>/mlartifacts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

ROLE_TAG = "memlayers.role"
ROLES: tuple[str, ...] = ("study", "cell", "tuning", "run")
RUN_NAME_TAG = "mlflow.runName"
PARENT_TAG = "mlflow.parentRunId"
FAILURE_TAG = "failure_reason"
STORAGE_TAG = "memlayers.storage"  # on a study's parent run: its storage folder (<storage>/<study>, or its workdir)
STARTED_TAG = "memlayers.started_at"        # unix time a study cell's trial began (start-up is measured from it)
FIRST_STEP_TAG = "memlayers.first_step_at"  # unix time rank 0 finished the run's first training step
ATTEMPT_TAG = "memlayers.attempt"    # the study job (one controller's launch of a cell) a run belongs to
ATTEMPTS_TAG = "memlayers.attempts"  # how many times that job's trial started the run (Tune retries count)
PROGRESS_TAG = "memlayers.progress"  # a running run's latest step, overwritten every log_every steps
SQLITE_PREFIX = "sqlite:///"
CHECKPOINT_TAG = "checkpoint"  # a finished run's final checkpoint folder
EVAL_PREFIX = "eval/"  # downstream scores of a run's final checkpoint: eval/<task>/<metric>
CELLS_FILE = "cells.json"  # a study's current cells: in its workdir, its storage folder and on its parent run
CONTROLLER_TAG = "memlayers.controller"  # on a study's parent run: the lease of the controller running it (JSON)
# On a study's experiment: MLflow's UI opens an experiment of this kind in its "Model training" view (the
# runs table with metric columns) instead of its GenAI overview of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # + a key, on an experiment: a saved view of its runs table (JSON)
SET_ASIDE_PREFIX = "memlayers.set_aside/"  # + a refused checkpoint's new folder name: why it was not loaded


def run_tags(role: str, study: Optional[str] = None) -> dict[str, str]:
    """The tags that say what a run is: its role and, for study runs, the study."""
    if role not in ROLES:
        raise ValueError(f"unknown run role {role!r} (expected one of {', '.join(ROLES)})")
    return {ROLE_TAG: role, **({"study": study} if study is not None else {})}


def eval_metric(task: str, metric: str) -> str:
    """The MLflow metric of a downstream score: `eval/nq_open/exact_match`."""
    return f"{EVAL_PREFIX}{task}/{metric}"


def eval_tasks_logged(metric_keys) -> set[str]:
    """The tasks that have at least one `eval/<task>/<metric>` among `metric_keys`."""
    return {key[len(EVAL_PREFIX):].split("/", 1)[0] for key in metric_keys
            if key.startswith(EVAL_PREFIX) and key.count("/") >= 2}


def role_filter(role: str, study: Optional[str] = None) -> str:
    """An MLflow search filter for the runs of one role (of one study)."""
    text = f"tags.`{ROLE_TAG}` = '{role}'"
    return f"{text} and tags.study = '{study}'" if study is not None else text


def cell_run_name(family: str, base: str, variant: Optional[str], budget: Optional[str], seed: int) -> str:
    """The run name of a cell: `memory_plus-nano-4k-seed0` (variant = memory size or `4x` experts;
    budget only for iso-FLOP sweeps, e.g. `1e15F`)."""
    return "-".join(p for p in (family, base, variant, budget, f"seed{seed}") if p)


def tuning_run_name(family: str, base: str, trial: int) -> str:
    return f"tune-{family}-{base}-t{trial}"


def progress_tags(step: int, loss: float, tokens_per_s: float) -> dict[str, str]:
    """The live progress of a run as one tag: a tag is overwritten, so the run's metrics (logged
    once each, after checkpoints) stay exactly-once while the progress line moves every log_every."""
    return {PROGRESS_TAG: f"{step} {loss:.6g} {tokens_per_s:.6g}"}


def set_aside_tags(where: str, reason: str) -> dict[str, str]:
    """The tag that records a checkpoint moved aside (`.../checkpoint_00000020.bad-checksum`) and why."""
    return {SET_ASIDE_PREFIX + where.rstrip("/").rsplit("/", 1)[-1]: reason[:500]}


def read_progress(tags: dict[str, str]) -> Optional[tuple[int, float, float]]:
    """(step, loss, tokens/s) from a run's tags, None when it has reported none."""
    try:
        step, loss, rate = tags[PROGRESS_TAG].split()
        return int(step), float(loss), float(rate)
    except (KeyError, ValueError):
        return None


def sqlite_uri(workdir: Path) -> str:
    """The embedded default tracking store of a work directory."""
    return f"{SQLITE_PREFIX}{(Path(workdir) / 'mlflow.db').resolve()}"


def artifact_root(workdir: Path) -> str:
    return (Path(workdir) / "mlartifacts").resolve().as_uri()


def artifact_location(tracking_uri: str, storage_root: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: None (the server's own, `mlflow-artifacts:`) for a
    tracking server, `<storage_root>/mlartifacts` otherwise (a local root as a file URI)."""
    if is_remote(tracking_uri):
        return None
    if "://" in storage_root and not storage_root.startswith("file://"):
        return storage_root.rstrip("/") + "/mlartifacts"
    return artifact_root(Path(storage_root.removeprefix("file://")))


def sqlite_path(tracking_uri: str) -> Optional[Path]:
    """The file of a `sqlite:///` store, None for any other URI."""
    return Path(tracking_uri[len(SQLITE_PREFIX):]) if tracking_uri.startswith(SQLITE_PREFIX) else None


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite:/// store whose file does not exist (reading would create it)."""
    path = sqlite_path(tracking_uri)
    return path.is_file() if path is not None else True


def is_remote(tracking_uri: str) -> bool:
    """An MLflow tracking server (http/https), which every node of a cluster can reach."""
    return tracking_uri.startswith(("http://", "https://"))
