"""Where a study lives: its name, work directory and MLflow tracking URI.

Commands that inspect a finished or running study (`study status`, `fit --study`, `report`,
`dashboard`) accept either a study file or a bare study name; this module turns either into a
`StudyRef`. The embedded default keeps everything of study NAME under `./runs/NAME/`:
`mlflow.db` (SQLite tracking store), `mlartifacts/` and the controller's own files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class StudyRef:
    name: str
    workdir: Path
    tracking_uri: str
    file: Path | None = None


def default_workdir(name: str, root: Path | None = None) -> Path:
    return ((root or RUNS_ROOT) / name).resolve()


def sqlite_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def artifact_root(workdir: Path) -> str:
    return (workdir / "mlartifacts").resolve().as_uri()


def resolve_study(ref: str, tracking_uri: str | None = None, root: Path | None = None) -> StudyRef:
    """A study file (path ending in .yaml/.yml that exists) or a study name -> StudyRef."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"study file not found: {ref}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ValueError(f"{ref}: name: a study file needs a string 'name'")
        name = data["name"]
        workdir = Path(data["workdir"]).resolve() if data.get("workdir") else default_workdir(name, root)
        tracking = data.get("tracking") or {}
        uri = tracking_uri or (tracking.get("uri") if isinstance(tracking, dict) else None) or sqlite_uri(workdir)
        return StudyRef(name=name, workdir=workdir, tracking_uri=uri, file=path.resolve())
    workdir = default_workdir(ref, root)
    return StudyRef(name=ref, workdir=workdir, tracking_uri=tracking_uri or sqlite_uri(workdir))
