"""A study's record: the one owner of its folder and storage prefix, and the one way its laws are fitted.

A study keeps its files in its work directory and, with storage, under `<storage>/<name>/` as well:
`study.yaml` (the definition it ran), `cells.json` (its current cells), `laws/laws.json` (fitted laws
and checked claims), `report/report.html`, `checkpoints/` and `tune/` (Ray Tune's state). Every file
is written whole or not at all (`storage.write_bytes`: temp file, fsync, rename locally; an object is
uploaded only once its content is complete). A reader takes the storage folder's copy first: that is
what the cluster wrote, while a laptop's work directory may hold an older one.

`fit_and_record` is the only fit of a study's laws: the controller after the grid, `memlayers fit
--study` and the report (when the recorded laws are not current) all call it, so the claims are
always checked and `laws.json` is always fitted on the study's current cells (those of its current
study file, never the runs of an earlier version of it) with the study's own fit settings.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from memlayers.config_schema import ConfigError, from_dict, parse_yaml, to_dict
from memlayers.platform.cluster import storage
from memlayers.platform.laws.claims import check_claims, claim_line
from memlayers.platform.laws.io import dumps
from memlayers.platform.laws.study import fit_study, rows_sha256
from memlayers.platform.study.schema import FitConfig, Study, StudyError
from memlayers.platform.tracking.client import client_for
from memlayers.platform.tracking.conventions import CELLS_FILE, store_exists
from memlayers.platform.tracking.runs import load_study_rows, log_laws_artifact, parent_run_id
from memlayers.platform.tracking.study_ref import StudyRef

DEFINITION_FILE = "study.yaml"
LAWS_FILE = "laws/laws.json"
REPORT_DIR = "report"
REPORT_FILE = "report/report.html"
CHECKPOINTS_DIR = "checkpoints"
TUNE_DIR = "tune"
CLAIM_BOOTSTRAP = 1000  # a claim's interval needs more resamples than a law's, whatever the study's setting
SECTIONS = {"compute": ("compute_laws", "multipliers"), "memory": ("memory_laws",), "recall": ("memory_laws",)}


class RecordError(ValueError):
    """A file of the study's record cannot be used; the message is one line naming it."""


@dataclass
class StudyRecord:
    name: str
    workdir: Path
    tracking_uri: str
    root: str                                  # the storage folder: <storage>/<name>, or the workdir itself
    file: Optional[Path] = None                # the study file the caller named, if any
    study: Optional[Study] = None              # the validated study, when the caller has it
    _definition: Optional[tuple[Optional[str], str]] = field(default=None, repr=False)

    @classmethod
    def of_study(cls, study: Study) -> "StudyRecord":
        return cls(study.name, study.workdir_path(), study.tracking_uri(), study.storage_root(), study.file, study)

    @classmethod
    def of_ref(cls, ref: StudyRef) -> "StudyRecord":
        root = ref.storage or storage.study_folder(None, ref.name, ref.workdir)
        return cls(ref.name, Path(ref.workdir).resolve(), ref.tracking_uri, root, ref.file)

    # -- where things are ------------------------------------------------------------------------

    @property
    def remote(self) -> bool:
        """True when the storage folder is not the work directory (a bucket or another path)."""
        return storage.local_path(self.root) != self.workdir.resolve()

    def local(self, name: str) -> Path:
        return self.workdir.joinpath(*name.split("/"))

    def location(self, name: str) -> str:
        return storage.join(self.root, *name.split("/"))

    def checkpoints(self) -> str:
        return self.location(CHECKPOINTS_DIR)

    def tune_state(self) -> str:
        return self.location(TUNE_DIR)

    def report_dir(self) -> Path:
        return self.local(REPORT_DIR)

    # -- files -----------------------------------------------------------------------------------

    def write(self, name: str, data: bytes) -> Path | str:
        """Write file `name` whole into the workdir and the storage folder; returns where it is kept."""
        storage.write_bytes(str(self.local(name)), data)
        if self.remote:
            storage.write_bytes(self.location(name), data)
            return self.location(name)
        return self.local(name)

    def publish(self, path: Path) -> Path | str:
        """Copy a file written under the workdir (the report) to the storage folder; where it is kept."""
        return storage.publish(Path(path), self.workdir, self.root)

    def read(self, name: str) -> Optional[bytes]:
        """File `name`: the storage folder's copy, else the workdir's; None when neither exists."""
        data = storage.read_bytes(self.location(name)) if self.remote else None
        local = self.local(name)
        return data if data is not None else local.read_bytes() if local.is_file() else None

    def read_json(self, name: str):
        data = self.read(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as error:  # a copy cut short by a crash before writes were atomic, or edited by hand
            raise RecordError(f"{self.location(name)}: not valid JSON ({error}); "
                              f"refit with `memlayers fit --study {self.name}`") from None

    def write_definition(self, cells: list[dict]) -> None:
        """The study file as `study.yaml` and the table of its cells as `cells.json`."""
        if self.file is not None:
            self.write(DEFINITION_FILE, Path(self.file).read_bytes())
        self.write(CELLS_FILE, json.dumps(cells, indent=1).encode())

    # -- what the study is now -------------------------------------------------------------------

    def definition(self) -> tuple[Optional[str], str]:
        """The study YAML and where it came from: the named file, the recorded `study.yaml`, or the
        file logged to the study's parent run."""
        if self._definition is None:
            self._definition = self._find_definition()
        return self._definition

    def _find_definition(self) -> tuple[Optional[str], str]:
        if self.file is not None and Path(self.file).is_file():
            return Path(self.file).read_text(), str(self.file)
        data = self.read(DEFINITION_FILE)
        if data is not None:
            return data.decode(), self.location(DEFINITION_FILE) if self.remote else str(self.local(DEFINITION_FILE))
        parent = self.parent_run()
        return _definition_artifact(self.tracking_uri, parent) if parent else (None, "")

    def valid_study(self) -> Optional[Study]:
        """The study the named file defines (None when no file is named or it does not validate)."""
        if self.study is None and self.file is not None:
            from memlayers.platform.study.validate import load_study  # deferred: validation imports the model zoo

            try:
                self.study = load_study(self.file)
            except StudyError:
                return None
        return self.study

    def fit_config(self) -> FitConfig:
        """The `fit` section of the study's definition (defaults without one)."""
        study = self.valid_study()
        if study is not None:
            return study.fit
        text, source = self.definition()
        try:
            data = parse_yaml(text, source) if text else None
            section = data.get("fit") if isinstance(data, dict) else None
            fit = from_dict(FitConfig, section or {}, "fit")
            fit.validate()
        except ConfigError as error:
            raise RecordError(f"{source}: {error}") from None
        return fit

    def current_cells(self) -> Optional[set[str]]:
        """Ids of the study's current cells: the named study file's, else the recorded `cells.json`'s;
        None when neither is known (then every cell run counts)."""
        study = self.valid_study()
        if study is not None:
            from memlayers.platform.study.cells import expand  # deferred: the cell expansion imports the model zoo

            return {cell.id for cell in expand(study, account_budgets=False)}
        table = self.read_json(CELLS_FILE)
        return {cell["id"] for cell in table} if table is not None else None

    def parent_run(self) -> Optional[str]:
        if not store_exists(self.tracking_uri):
            return None
        try:
            return parent_run_id(self.name, self.tracking_uri)
        except ValueError:  # no experiment of that name
            return None

    def rows(self, notes: Optional[list[str]] = None) -> list[dict]:
        """The finished runs of the current cells as fit rows (one run per cell; see `load_study_rows`)."""
        return load_study_rows(self.name, self.tracking_uri, cells=self.current_cells(), notes=notes)


def _definition_artifact(uri: str, run_id: str) -> tuple[Optional[str], str]:
    """The first YAML file among the parent run's artifacts (root, then one folder down)."""
    try:
        client = client_for(uri)
        entries = client.list_artifacts(run_id)
        found = [e.path for e in entries if not e.is_dir and e.path.endswith((".yaml", ".yml"))]
        for folder in (e.path for e in entries if e.is_dir):
            found += [e.path for e in client.list_artifacts(run_id, folder)
                      if not e.is_dir and e.path.endswith((".yaml", ".yml"))]
        if not found:
            return None, ""
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, found[0], tmp)
            return Path(local).read_text(), f"artifact {found[0]} of the study's parent run"
    except Exception:  # an unreachable artifact store leaves the study without a definition, not failed
        return None, ""


# -- the laws --------------------------------------------------------------------------------------

@dataclass
class Fitted:
    laws: dict
    rows: list[dict]
    where: Path | str | None = None           # where laws.json is kept (None: not written)
    warning: str = ""                         # what went wrong besides the fit (logging to MLflow)


def settings_sha256(fit: FitConfig) -> str:
    """A digest of what, besides the runs and the bootstrap, decides a study's laws: the laws asked
    for and the claims; recorded laws fitted under other settings are not the study's current ones."""
    settings = {"laws": list(fit.laws), "claims": [to_dict(c) for c in fit.claims]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def fit_and_record(record: StudyRecord, *, bootstrap: Optional[int] = None, seed: int = 0,
                   rows: Optional[list[dict]] = None, notes: Optional[list[str]] = None,
                   log: bool = True, to: Optional[Path] = None) -> Fitted:
    """Fit the study's laws and check its claims on its current cells' finished runs, write
    `laws/laws.json` (workdir and storage folder; the file `to` instead when given) and log it to the
    parent run. `bootstrap` defaults to the study's `fit.bootstrap`. Raises on failure, leaving the
    recorded file as it was."""
    fit = record.fit_config()
    replicates = fit.bootstrap if bootstrap is None else bootstrap
    notes = list(notes or [])
    rows = record.rows(notes) if rows is None else rows
    laws = fit_study(rows, bootstrap=replicates, seed=seed)
    wanted = {section for law in fit.laws for section in SECTIONS[law]}
    for section in ("compute_laws", "multipliers", "memory_laws"):
        if section not in wanted:
            laws.pop(section, None)
    laws["claims"] = check_claims(rows, [to_dict(c) for c in fit.claims],
                                  bootstrap=max(replicates, CLAIM_BOOTSTRAP), seed=seed)
    parent = record.parent_run()
    _, definition = record.definition()
    laws["notes"] = notes
    laws["provenance"] = {"study": record.name, "tracking_uri": record.tracking_uri, "parent_run_id": parent,
                          "definition": definition, "laws": list(fit.laws),
                          "settings_sha256": settings_sha256(fit)}
    data = (dumps(laws) + "\n").encode()
    if to is not None:
        storage.write_bytes(str(Path(to).resolve()), data)
    fitted = Fitted(laws, rows, Path(to) if to is not None else record.write(LAWS_FILE, data))
    if log and parent:
        try:
            log_laws_artifact(record.name, record.tracking_uri, to or record.local(LAWS_FILE),
                              artifact_path=LAWS_FILE.rsplit("/", 1)[0], run_id=parent)
        except Exception as error:  # the recorded file is what matters; the artifact is a copy
            fitted.warning = f"laws.json not logged to MLflow ({type(error).__name__}: {error})"
    return fitted


def recorded_laws(record: StudyRecord, rows: list[dict], bootstrap: Optional[int] = None,
                  seed: int = 0) -> tuple[Optional[dict], str]:
    """(the recorded laws, "") when they were fitted on exactly `rows` under the study's current
    settings (with `bootstrap` replicates and `seed` when `bootstrap` is given); else (None, why not)."""
    try:
        saved = record.read_json(LAWS_FILE)
    except RecordError as error:
        return None, str(error)
    if saved is None:
        return None, "no recorded laws"
    where = record.location(LAWS_FILE)
    if saved.get("input_sha256") != rows_sha256(rows):
        return None, f"{where} was fitted on other runs than the study has now"
    if (saved.get("provenance") or {}).get("settings_sha256") != settings_sha256(record.fit_config()):
        return None, f"{where} was fitted for other laws or claims than the study's"
    if bootstrap is not None and saved.get("bootstrap") != {"replicates": bootstrap, "seed": seed}:
        return None, f"{where} was fitted with another bootstrap than {bootstrap} replicates (seed {seed})"
    return saved, ""


def print_claims(laws: Optional[dict], out: Callable[[str], None]) -> None:
    """The claims of `laws` (this fit's, never an earlier file's), one line each."""
    if laws is None:
        out("claims: not checked (no laws were fitted)")
        return
    claims = laws.get("claims", [])
    if claims:
        out(f"claims ({sum(c['holds'] for c in claims)}/{len(claims)} hold in every seed):")
        for claim in claims:
            out(f"  {claim['id']}: {claim_line(claim)}")
