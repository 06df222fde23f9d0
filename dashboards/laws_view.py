"""The study's fitted laws as the report reads them, and the points each law was fitted on.

Source, in order: `<workdir>/laws/laws.json` written by `memlayers fit --study` (or the
controller) when it was fitted on exactly the study's current finished runs (same input digest);
otherwise `fit_study` on the current runs, in memory, with a modest bootstrap. The structure is
`memlayers.platform.laws.study.fit_study`'s: `compute_laws[family]`, `memory_laws["base/family"]
[metric]`, `multipliers["vs_dense"|"vs_moe"][family]`; an entry that could not be fitted is
`{"skipped": reason}`. Accessors here return (entry, reason) so figures can say why a curve is absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memlayers.platform.laws.study import fit_study, rows_sha256
from memlayers.platform.study.ref import StudyRef
from memlayers.platform.tracking.runs import load_study_rows

LAWS_FILE = Path("laws") / "laws.json"
REPORT_BOOTSTRAP = 100


@dataclass
class StudyLaws:
    laws: dict | None = None
    source: str = ""                                   # where the laws came from
    note: str = ""                                     # why there are none, or what was refitted
    rows: list[dict] = field(default_factory=list)     # the finished runs as fit rows

    def row_by_run(self) -> dict[str, dict]:
        return {str(row.get("run_id")): row for row in self.rows}

    def compute_law(self, family: str) -> tuple[dict | None, str]:
        return _entry((self.laws or {}).get("compute_laws", {}), family, f"no compute law for {family}")

    def compute_laws(self) -> dict[str, dict]:
        """Every fitted compute law (skipped ones left out), by family or `family[variant]`."""
        laws = (self.laws or {}).get("compute_laws", {})
        return {name: entry for name, entry in laws.items() if isinstance(entry, dict) and "params" in entry}

    def memory_law(self, base: str, family: str, metric: str) -> tuple[dict | None, str]:
        groups = (self.laws or {}).get("memory_laws", {})
        keys = [k for k in groups if k == f"{base}/{family}" or k.startswith(f"{base}/{family}@")]
        if not keys:
            return None, f"no memory-size law for {family} on {base}"
        return _entry(groups[keys[-1]], metric, f"no {metric} law for {family} on {base}")

    def multipliers(self, reference: str) -> tuple[dict | None, str]:
        return _entry((self.laws or {}).get("multipliers", {}), f"vs_{reference}", f"no multipliers vs {reference}",
                      kind="comparison")

    def points(self, entry: dict, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the runs a law was fitted on (its provenance), in the order fitted."""
        by_run = self.row_by_run()
        xs, ys = [], []
        for run_id in (entry.get("provenance") or {}).get("runs", []):
            row = by_run.get(str(run_id))
            if row and row.get(x_key) is not None and row.get(y_key) is not None:
                xs.append(float(row[x_key]))
                ys.append(float(row[y_key]))
        return xs, ys


def _entry(container: dict, key: str, missing: str, kind: str = "law") -> tuple[dict | None, str]:
    entry = container.get(key) if isinstance(container, dict) else None
    if not isinstance(entry, dict):
        return None, missing
    if "skipped" in entry:
        return None, str(entry["skipped"])
    if kind == "law" and "params" not in entry:
        return None, missing
    return entry, ""


def load_laws(ref: StudyRef, *, bootstrap: int = REPORT_BOOTSTRAP, seed: int = 0, refit: bool = True) -> StudyLaws:
    """The study's laws (saved if current, else fitted now unless `refit` is False: a study that
    disables fitting); never raises for a small study."""
    try:
        rows = load_study_rows(ref.name, ref.tracking_uri, ref.workdir)
    except ValueError as error:
        return StudyLaws(note=str(error))
    if not rows:
        return StudyLaws(note="no finished cell runs to fit", rows=rows)
    saved_path = Path(ref.workdir) / LAWS_FILE
    note = ""
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            saved, note = None, f"{saved_path} is not valid JSON; refitted"
        if saved is not None and saved.get("input_sha256") == rows_sha256(rows):
            return StudyLaws(laws=saved, source=str(saved_path), rows=rows)
        note = note or f"{saved_path} was fitted on other runs than the study has now; refitted"
    if not refit:
        return StudyLaws(note="the study disables fitting (fit.enabled: false)", rows=rows)
    laws = fit_study(rows, bootstrap=bootstrap, seed=seed)
    return StudyLaws(laws=laws, source=f"fitted for this report (bootstrap {bootstrap}, seed {seed})",
                     note=note, rows=rows)
