"""The STUDY argument of `memlayers report` and `memlayers dashboard`: a file, a name, or a work dir.

A study file or a study name resolves as everywhere else (`platform.tracking.study_ref.resolve_study`).
A directory holding an `mlflow.db` is taken as a study's work directory (`runs/quickstart/`): its
study is the experiment named like the directory, else the store's only study. Before anything
opens the store, `existing_store` checks that a SQLite store exists, so that inspecting a study
that never ran does not create an empty database.
"""

from __future__ import annotations

from pathlib import Path

from memlayers.platform.tracking.conventions import role_filter, sqlite_path, sqlite_uri
from memlayers.platform.tracking.study_ref import StudyRef, resolve_study


class StudyNotFound(ValueError):
    pass


def _study_in_store(uri: str, fallback: str) -> str:
    """The experiment named `fallback` if it exists, else the only experiment holding a study run."""
    from mlflow.tracking import MlflowClient  # deferred: mlflow is heavy and only this path needs it

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(fallback) is not None:
        return fallback
    names = [e.name for e in client.search_experiments()
             if client.search_runs([e.experiment_id], role_filter("study"), max_results=1)]
    return names[0] if len(names) == 1 else fallback


def resolve_study_arg(arg: str, tracking_uri: str | None = None) -> StudyRef:
    """StudyRef for a study file, a study name, or a study work directory."""
    path = Path(arg)
    if path.is_dir() and (path / "mlflow.db").is_file():
        workdir = path.resolve()
        uri = tracking_uri or sqlite_uri(workdir)
        return StudyRef(name=_study_in_store(uri, workdir.name), workdir=workdir, tracking_uri=uri)
    try:
        return resolve_study(arg, tracking_uri)
    except (FileNotFoundError, ValueError) as error:
        raise StudyNotFound(str(error)) from None


def existing_store(ref: StudyRef) -> None:
    """Raise StudyNotFound when the study's SQLite store does not exist (other stores pass)."""
    db = sqlite_path(ref.tracking_uri)
    if db is not None:
        if not db.is_file():
            raise StudyNotFound(f"study {ref.name}: no tracking store at {db} (has the study run?)")


def experiment_id(ref: StudyRef) -> str | None:
    from mlflow.tracking import MlflowClient  # deferred: mlflow is heavy and only this path needs it

    experiment = MlflowClient(tracking_uri=ref.tracking_uri).get_experiment_by_name(ref.name)
    return experiment.experiment_id if experiment is not None else None
