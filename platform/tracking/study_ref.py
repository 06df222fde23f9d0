"""Where a study lives: its name, work directory and MLflow tracking URI.

Below the study and eval packages, which both turn a study's name into its store.

Commands that inspect a finished or running study (`study status`, `fit --study`, `report`,
`dashboard`) accept either a study file or a bare study name; this module turns either into a
`StudyRef`. The embedded default keeps everything of study NAME under `./runs/NAME/`:
`mlflow.db` (SQLite tracking store), `mlartifacts/` and the controller's own files. A study with
storage keeps its durable files in `<storage>/<name>/` (`StudyRef.storage`), which a machine
outside the cluster reads given the storage root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memlayers.config_schema import ConfigError, read_yaml
from memlayers.platform.cluster.storage import study_root
from memlayers.platform.tracking.conventions import sqlite_uri

RUNS_ROOT = Path("runs")  # the embedded default: everything of run or study NAME under ./runs/NAME/
RUNS_ROOT_ENV = "MEMLAYERS_RUNS_ROOT"  # overrides RUNS_ROOT (`study submit` sets it: never Ray's session folder)


def default_workdir(name: str, root: Path | None = None) -> Path:
    env_root = os.environ.get(RUNS_ROOT_ENV)
    return ((root or (Path(env_root).expanduser() if env_root else RUNS_ROOT)) / name).resolve()


@dataclass(frozen=True)
class StudyRef:
    name: str
    workdir: Path
    tracking_uri: str
    file: Path | None = None
    storage: str | None = None          # the study's storage folder (<storage>/<name>), None without storage


def resolve_study(ref: str, tracking_uri: str | None = None, root: Path | None = None,
                  storage: str | None = None) -> StudyRef:
    """A study file (path ending in .yaml/.yml that exists) or a study name -> StudyRef; `storage`
    (a storage root) overrides the file's."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {ref}")
        try:
            data = read_yaml(path) or {}
        except ConfigError as error:
            raise ValueError(str(error)) from None
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ValueError(f"{ref}: name: a study file needs a string 'name'")
        name = data["name"]
        workdir = Path(data["workdir"]).resolve() if data.get("workdir") else default_workdir(name, root)
        tracking = data.get("tracking") or {}
        uri = tracking_uri or (tracking.get("uri") if isinstance(tracking, dict) else None) or sqlite_uri(workdir)
        storage = storage or (data.get("storage") if isinstance(data.get("storage"), str) else None)
        return StudyRef(name=name, workdir=workdir, tracking_uri=uri, file=path.resolve(),
                        storage=study_root(storage, name) if storage else None)
    workdir = default_workdir(ref, root)
    return StudyRef(name=ref, workdir=workdir, tracking_uri=tracking_uri or sqlite_uri(workdir),
                    storage=study_root(storage, ref) if storage else None)
