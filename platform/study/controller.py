"""The study controller: expand a study, run the cells that are not finished on Ray Tune, fit, report.

`run_study(study, address=None)`:
1. expands the study into cells (a word tokenizer's vocabulary, which the FLOP accounting needs,
   is built in a temporary directory) and refuses a budget that buys no step before creating anything;
2. opens the MLflow store (default `sqlite:///<workdir>/mlflow.db`, artifacts in
   `<workdir>/mlartifacts`), the experiment named after the study and ONE parent run tagged
   `memlayers.role=study` (reused when the study is run again), and logs the study file;
3. skips cells whose run FINISHED; a cell whose run did not finish (a killed driver, a failure)
   continues that same run (`tracking.run_id`), so every cell keeps exactly one run;
4. joins Ray (`address`) or starts a local Ray on this machine, tunes learning rates with Optuna
   when the study asks for it (tuning.py), and runs the remaining cells as Ray Tune trials: a
   function trainable per cell trains it in the trial (one worker) or fits a TorchTrainer
   (trials.py, `resources.runner`); at most as many trials run at once as the cluster's CPUs/GPUs fit. A failed cell is recorded (run FAILED, tag
   `failure_reason`) and the others go on. Progress lines are printed as cells start and finish;
5. with an `eval` section, evaluates every finished cell without scores on its final checkpoint,
   one Ray task per cell (platform/eval/stage.py), and logs `eval/<task>/<metric>` to its run;
6. fits the scaling laws (memlayers.platform.laws) and writes the report (a writer the CLI hands in),
   each guarded: if one is missing or fails, a warning and the table of results are printed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import memlayers
import ray
from memlayers.config_schema import to_dict
from memlayers.platform.cluster import storage
from memlayers.platform.cluster.reaper import reaper
from memlayers.platform.cluster.session import ray_cluster, ray_env
from memlayers.platform.cluster.visibility import shared_problems
from memlayers.platform.laws.claims import check_claims, claim_line
from memlayers.platform.laws.io import dumps
from memlayers.platform.laws.study import fit_study
from memlayers.platform.finetune.cells import pretrain_sources
from memlayers.platform.study.bookkeeping import log_definition, open_parent_run, record_failure
from memlayers.platform.study.cells import Cell, expand
from memlayers.platform.study.data_prep import prepare_study_data
from memlayers.platform.study.progress import ProgressPrinter, cell_runs, cell_states, latest, summary_line
from memlayers.platform.study.ref import StudyRef
from memlayers.platform.study.schema import Study, StudyError
from memlayers.platform.study.trials import run_jobs
from memlayers.platform.study.tuning import tune_learning_rates
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.retry import wait_for_tracking
from memlayers.platform.tracking.runs import load_study_rows, log_laws_artifact

# The report writer is handed in by the CLI (dashboards sit above platform): StudyRef -> path or None.
ReportWriter = Callable[[StudyRef], Optional[Path]]

@dataclass
class StudyResult:
    name: str
    workdir: Path
    tracking_uri: str
    parent_run_id: str
    cells: list[Cell]
    states: dict[str, str]              # cell id -> done | failed | ...
    results: dict[str, dict] = field(default_factory=dict)  # cell id -> what its trial reported
    laws: Optional[Path | str] = None    # a local path, or its URI in the study's storage folder
    report: Optional[Path | str] = None

    @property
    def ok(self) -> bool:
        return all(state == "done" for state in self.states.values())


def run_study(study: Study, address: str | None = None, *, num_cpus: int | None = None,
              workdir: Path | None = None, out: Callable[[str], None] = print, fit: bool = True,
              report: Optional[ReportWriter] = None, poll_interval: float = 2.0) -> StudyResult:
    """Run every unfinished cell of `study` (see the module docstring); returns where things are.
    `report` writes the HTML report of a StudyRef (the CLI passes the dashboards' writer)."""
    ray_env()
    if workdir is not None:
        study = dataclasses.replace(study, workdir=str(Path(workdir).resolve()))
    workdir = study.workdir_path()
    uri = study.tracking_uri()
    if study.finetune is not None:  # a source cell of a study that has not trained it yet is pretrained first
        pretrain_sources(study, lambda source: run_study(source, address, num_cpus=num_cpus, out=out, fit=False), out)
    cells = expand(study)  # a budget that buys no step raises here, before anything is created
    if ray.is_initialized():  # joined a cluster (the CLI joins first): refuse what some node cannot reach
        problems = shared_problems(uri, study.storage_root())
        if problems:
            raise StudyError(problems)
    workdir.mkdir(parents=True, exist_ok=True)
    wait_for_tracking(uri, out=out)  # a tracking server restarting: wait (bounded) rather than fail the study
    prepare_study_data(study, cells, uri, out)  # before any cell: once, as far as the largest cell reads
    out(f"study {study.name}: memlayers {memlayers.__version__} from {Path(memlayers.__file__).parent}")
    parent = open_parent_run(study, uri, workdir)
    log_definition(study, cells, uri, parent, workdir)
    runs = cell_runs(uri, study.name)
    states = cell_states([c.id for c in cells], runs)
    todo = [c for c in cells if states[c.id] != "done"]
    out(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished; "
        f"MLflow {uri} (parent run {parent})")

    results: dict[str, dict] = {}
    if todo:
        starts_ray, started = address is None and not ray.is_initialized(), time.time()
        with ray_cluster(address, num_cpus=num_cpus), reaper(since=started, enabled=starts_ray):
            lrs = _learning_rates(study, todo, workdir, uri, parent, out)
            jobs = {}
            for cell in todo:
                previous = latest(runs.get(cell.id, []))
                jobs[cell.id] = cell.run_config(
                    workdir=workdir, tracking_uri=uri, parent_run_id=parent,
                    run_id=previous.run_id if previous is not None else None,
                    lr=lrs.get((cell.base, cell.family)), system_metrics=study.tracking.system_metrics,
                    storage=study.storage)
                jobs[cell.id].tracking.tags.update(lr=f"{jobs[cell.id].train.lr:.6g}",
                                                   lr_source="tuned" if study.lr.tune else "fixed")
                if previous is not None:
                    out(f"  {cell.name}: continuing its unfinished run {previous.run_id}")
            lost = "the trial reported nothing"
            with ProgressPrinter(uri, study.name, todo, out, poll_interval):
                try:
                    results = run_jobs(jobs, workdir=workdir, label="cells", storage_root=study.storage_root())
                except Exception as error:  # Tune itself failed: every cell still ends finished or failed
                    lost = f"the trials ended early: {type(error).__name__}: {error}".splitlines()[0][:500]
                    out(f"warning: {lost}")
            wait_for_tracking(uri, out=out)  # cells are judged by the store: never while it is down
            after = cell_states([c.id for c in todo], cell_runs(uri, study.name))
            for cell in todo:  # MLflow decides: a cell whose run did not finish is failed, never left pending
                if after[cell.id] != "done":
                    reason = str((results.get(cell.id) or {}).get("error") or lost)
                    record_failure(study, cell, jobs[cell.id], uri, reason)
                    out(f"  {cell.name}: FAILED: {reason}")
    states = cell_states([c.id for c in cells], cell_runs(uri, study.name))
    tracking.set_tags(uri, parent, {"cells_done": sum(s == "done" for s in states.values()),
                                    "cells_failed": sum(s == "failed" for s in states.values())})
    tracking.set_status(uri, parent, "FINISHED")
    out(f"study {study.name}: {summary_line(states)}")
    result = StudyResult(study.name, workdir, uri, parent, cells, states, results)
    if study.eval is not None and any(state == "done" for state in states.values()):
        from memlayers.platform.eval.stage import run_eval_stage  # deferred: lm_eval only for a study with eval
        with ray_cluster(address, num_cpus=num_cpus):
            run_eval_stage(study.name, uri, study.eval, out)
    if fit and study.fit.enabled:
        result.laws = fit_laws(study, uri, workdir, parent, out)
    if report is not None and study.report:
        result.report = write_report(report, study, workdir, uri, out)
    _print_locations(result, out)
    _print_claims(workdir / "laws" / "laws.json", out)
    return result


def _learning_rates(study: Study, todo: list[Cell], workdir: Path, uri: str, parent: str,
                    out: Callable[[str], None]) -> dict:
    if not study.lr.tune:
        return {}
    return tune_learning_rates(study, todo, workdir=workdir, tracking_uri=uri, parent_run_id=parent, out=out,
                               run_jobs=lambda jobs: run_jobs(jobs, workdir=workdir, label="tuning",
                                                              storage_root=study.storage_root()))


def fit_laws(study: Study, uri: str, workdir: Path, parent: str, out: Callable[[str], None]) -> Optional[Path | str]:
    """Fit the study's laws to its finished runs into `<workdir>/laws/laws.json` (logged to the
    parent run, copied to the study's storage folder); on any problem print a warning and the
    table of results instead."""
    try:
        rows = load_study_rows(study.name, uri, workdir)
        laws = fit_study(rows, bootstrap=study.fit.bootstrap)
        keep = {"compute": ("compute_laws", "multipliers"), "memory": ("memory_laws",), "recall": ("memory_laws",)}
        wanted = {section for law in study.fit.laws for section in keep[law]}
        for section in ("compute_laws", "multipliers", "memory_laws"):
            if section not in wanted:
                laws.pop(section, None)
        laws["claims"] = check_claims(rows, [to_dict(c) for c in study.fit.claims],
                                      bootstrap=max(study.fit.bootstrap, 1000))
        laws["provenance"] = {"study": study.name, "tracking_uri": uri, "parent_run_id": parent,
                              "laws": list(study.fit.laws)}
        path = workdir / "laws" / "laws.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(laws) + "\n")
        try:
            log_laws_artifact(study.name, uri, path, run_id=parent)
        except Exception as error:  # the file is what matters; the artifact is a copy
            out(f"warning: laws.json not logged to MLflow ({type(error).__name__}: {error})")
        for name, entry in laws.get("compute_laws", {}).items():
            out(f"  compute law {name}: " + (f"skipped ({entry['skipped']})" if "skipped" in entry else
                                             ", ".join(f"{k}={v:.4g}" for k, v in entry["params"].items())))
        return storage.publish(path, workdir, study.storage_root())
    except Exception as error:
        out(f"warning: scaling-law fit unavailable ({type(error).__name__}: {error}); the results:")
        for line in results_table(study.name, uri):
            out(line)
        return None


def write_report(writer: ReportWriter, study: Study, workdir: Path, uri: str,
                 out: Callable[[str], None]) -> Optional[Path | str]:
    """The HTML report by `writer` (copied to the study's storage folder); a failure is a warning,
    never the end of the study."""
    try:
        path = writer(StudyRef(study.name, workdir, uri, study.file))
        return storage.publish(Path(path), workdir, study.storage_root()) if path else None
    except Exception as error:
        out(f"warning: report not written ({type(error).__name__}: {error})")
        return None


def results_table(study: str, uri: str) -> list[str]:
    """One line per cell run: name, status, final val_loss / qa_exact_match / loss."""
    lines = [f"  {'run':<40} {'status':<9} {'val_loss':>9} {'qa_em':>7} {'loss':>9}"]
    for runs in cell_runs(uri, study).values():
        run = latest(runs)
        m = run.metrics
        cols = [f"{m[k]:.4g}" if k in m else "-" for k in ("val_loss", "qa_exact_match", "loss")]
        lines.append(f"  {run.name:<40} {run.status:<9} {cols[0]:>9} {cols[1]:>7} {cols[2]:>9}")
    return lines


def _print_locations(result: StudyResult, out: Callable[[str], None]) -> None:
    out(f"MLflow store: {result.tracking_uri} (experiment {result.name!r}, parent run {result.parent_run_id}); "
        f"browse with `memlayers dashboard {result.name}`")
    out(f"fitted laws: {result.laws if result.laws else 'not fitted (see above)'}")
    out(f"report: {result.report if result.report else 'not written (see above)'}")


def _print_claims(laws_path: Path, out: Callable[[str], None]) -> None:
    """The study's claims, last, one line each: what holds and what does not."""
    claims = json.loads(laws_path.read_text()).get("claims", []) if laws_path.is_file() else []
    if claims:
        out(f"claims ({sum(c['holds'] for c in claims)}/{len(claims)} hold in every seed):")
        for claim in claims:
            out(f"  {claim['id']}: {claim_line(claim)}")
