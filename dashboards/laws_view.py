"""The study's fitted laws as the report reads them, and the points each law was fitted on.

Source: the study's recorded `laws/laws.json` (written by the controller or `memlayers fit --study`)
when it was fitted on exactly the study's current finished runs under its current fit settings;
otherwise the laws are fitted and recorded now by the same `fit_and_record` (study/record.py), claims
included, so that the report never shows a fit of its own making. The structure is
`memlayers.platform.laws.study.fit_study`'s: `compute_laws[family]`, `memory_laws["base/family"]
[metric]`, `multipliers["vs_dense"|"vs_moe"][family]`; an entry that could not be fitted is
`{"skipped": reason}`. Accessors here return (entry, reason) so figures can say why a curve is absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memlayers.platform.study.record import LAWS_FILE, StudyRecord, fit_and_record, recorded_laws
from memlayers.platform.tracking.study_ref import StudyRef


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


def load_laws(ref: StudyRef, *, bootstrap: int | None = None, seed: int = 0, refit: bool | None = None,
              log: bool = True) -> StudyLaws:
    """The study's laws: recorded if current, else fitted and recorded now (`bootstrap` defaults to the
    study's `fit.bootstrap`), unless fitting is off (`refit`, default: the study's `fit.enabled`);
    never raises for a small study."""
    record = StudyRecord.of_ref(ref)
    notes: list[str] = []
    try:
        rows = record.rows(notes)
        saved, why = recorded_laws(record, rows, bootstrap, seed) if rows else (None, "")
        enabled = record.fit_config().enabled if refit is None else refit
    except ValueError as error:  # no experiment, or a record file that cannot be read (one line)
        return StudyLaws(note=str(error))
    if not rows:
        return StudyLaws(note="no finished cell runs to fit", rows=rows)
    if saved is not None:
        return StudyLaws(laws=saved, source=str(record.location(LAWS_FILE)), rows=rows)
    if not enabled:
        return StudyLaws(note="the study disables fitting (fit.enabled: false)", rows=rows)
    try:
        fitted = fit_and_record(record, bootstrap=bootstrap, seed=seed, rows=rows, notes=notes, log=log)
    except Exception as error:  # the report shows why there are no laws rather than failing
        return StudyLaws(note=f"the fit failed ({type(error).__name__}: {error})", rows=rows)
    return StudyLaws(laws=fitted.laws, source=f"fitted for this report, recorded in {fitted.where}", note=why,
                     rows=rows)
