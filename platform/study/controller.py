"""The study controller: expand a study, run the cells that are not finished on Ray Tune, fit, report.

`run_study(study, address=None)`:
1. expands the study into cells (a word tokenizer's vocabulary, which the FLOP accounting needs,
   is built in a temporary directory) and refuses a budget that buys no step before creating anything;
   takes the study (lease.py: a lock on its workdir, a lease on its parent run when controllers may
   share no disk); a second controller of a running study is refused here, having started nothing;
2. opens the MLflow store (default `sqlite:///<workdir>/mlflow.db`, artifacts in
   `<workdir>/mlartifacts`), the experiment named after the study and ONE parent run tagged
   `memlayers.role=study` (reused when the study is run again), and logs the study file;
3. skips cells whose run FINISHED; a cell whose run did not finish (a killed driver, a failure)
   continues that same run (`tracking.run_id`), so every cell keeps exactly one run;
4. joins Ray (`address`) or starts a local Ray on this machine, tunes learning rates with Optuna
   when the study asks for it (tuning.py), and runs the remaining cells as Ray Tune trials: a
   function trainable per cell trains it in the trial (one worker) or fits a TorchTrainer
   (trials.py, `resources.runner`); at most as many trials run at once as the cluster's CPUs/GPUs fit.
   A failed cell is recorded (run FAILED, tag `failure_reason`) and the others go on. Progress lines
   are printed as cells start and finish;
5. with an `eval` section, evaluates every finished cell without scores on its final checkpoint,
   one Ray task per cell (platform/eval/stage.py), and logs `eval/<task>/<metric>` to its run;
6. fits the scaling laws and checks the claims (record.fit_and_record) and writes the report (a writer
   the CLI hands in), each guarded: if one is missing or fails, a warning and the table of results are
   printed; the claims printed last are this fit's, never an earlier file's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import ray

import memlayers
from memlayers.platform.cluster.reaper import reaper
from memlayers.platform.cluster.session import ray_cluster, ray_env
from memlayers.platform.cluster.visibility import shared_problems
from memlayers.platform.finetune.cells import pretrain_sources
from memlayers.platform.study.bookkeeping import log_definition, parent_run, record_failure
from memlayers.platform.study.cells import Cell, expand
from memlayers.platform.study.data_prep import prepare_study_data
from memlayers.platform.study.lease import Holder, Lease, file_lock
from memlayers.platform.study.progress import ProgressPrinter, cell_runs, cell_states, latest, summary_line
from memlayers.platform.study.record import Fitted, StudyRecord, fit_and_record, print_claims
from memlayers.platform.study.schema import Study, StudyError
from memlayers.platform.study.trials import run_jobs
from memlayers.platform.study.tuning import tune_learning_rates
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import is_remote
from memlayers.platform.tracking.retry import wait_for_tracking
from memlayers.platform.tracking.study_ref import StudyRef

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
    record, me = StudyRecord.of_study(study), Holder.me()
    with file_lock(study.name, workdir, me):
        parent = parent_run(study, uri)
        shared = is_remote(uri) or record.remote  # controllers that share no workdir meet on the parent run
        with Lease(study.name, uri, parent, me, out=out) if shared else contextlib.nullcontext():
            return _run_held(study, record, cells, parent, address=address, num_cpus=num_cpus, out=out,
                             fit=fit, report=report, poll_interval=poll_interval)


def _run_held(study: Study, record: StudyRecord, cells: list[Cell], parent: str, *, address: str | None,
              num_cpus: int | None, out: Callable[[str], None], fit: bool, report: Optional[ReportWriter],
              poll_interval: float) -> StudyResult:
    """Steps 2-6 of the module docstring, by the controller that holds the study."""
    workdir, uri = record.workdir, record.tracking_uri
    out(f"study {study.name}: memlayers {memlayers.__version__} from {Path(memlayers.__file__).parent}")
    tracking.set_status(uri, parent, "RUNNING")
    prepare_study_data(study, cells, uri, out)  # before any cell: once, as far as the largest cell reads
    log_definition(study, cells, uri, parent, record)
    runs = cell_runs(uri, study.name)
    states = cell_states([c.id for c in cells], runs)
    todo = [c for c in cells if states[c.id] != "done"]
    out(f"study {study.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished; "
        f"MLflow {uri} (parent run {parent})")

    results: dict[str, dict] = {}
    if todo:
        starts_ray, started = address is None and not ray.is_initialized(), time.time()
        with ray_cluster(address, num_cpus=num_cpus), reaper(since=started, enabled=starts_ray):
            lrs = _learning_rates(study, todo, workdir, uri, parent, out, record.root)
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
                    results = run_jobs(jobs, workdir=workdir, label="cells", storage_root=record.root)
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
    fitted = fit_laws(record, out) if fit and study.fit.enabled else None
    result.laws = fitted.where if fitted is not None else None
    if report is not None and study.report:
        result.report = write_report(report, record, out)
    _print_locations(result, out)
    if fit and study.fit.enabled:
        print_claims(fitted.laws if fitted is not None else None, out)
    return result


def _learning_rates(study: Study, todo: list[Cell], workdir: Path, uri: str, parent: str,
                    out: Callable[[str], None], root: str) -> dict:
    if not study.lr.tune:
        return {}
    return tune_learning_rates(study, todo, workdir=workdir, tracking_uri=uri, parent_run_id=parent, out=out,
                               run_jobs=lambda jobs: run_jobs(jobs, workdir=workdir, label="tuning",
                                                              storage_root=root))


def fit_laws(record: StudyRecord, out: Callable[[str], None]) -> Optional[Fitted]:
    """The study's laws and claims, fitted and recorded (record.fit_and_record); on any problem a
    warning and the table of results instead, and None: no earlier verdict is passed off as this one."""
    try:
        fitted = fit_and_record(record)
    except Exception as error:
        out(f"warning: scaling-law fit unavailable ({type(error).__name__}: {error}); the results:")
        for line in results_table(record.name, record.tracking_uri):
            out(line)
        return None
    for line in [fitted.warning, *fitted.laws.get("notes", [])]:
        if line:
            out(f"warning: {line}")
    for name, entry in fitted.laws.get("compute_laws", {}).items():
        out(f"  compute law {name}: " + (f"skipped ({entry['skipped']})" if "skipped" in entry else
                                         ", ".join(f"{k}={v:.4g}" for k, v in entry["params"].items())))
    return fitted


def write_report(writer: ReportWriter, record: StudyRecord, out: Callable[[str], None]) -> Optional[Path | str]:
    """The HTML report by `writer` (copied to the study's storage folder); a failure is a warning,
    never the end of the study."""
    try:
        path = writer(StudyRef(record.name, record.workdir, record.tracking_uri, record.file,
                               record.root if record.remote else None))
        return record.publish(Path(path)) if path else None
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
