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
   function trainable per cell calls `run_training`, which fits a TorchTrainer; at most as many
   trials run at once as the cluster's CPUs/GPUs fit. A failed cell is recorded (run FAILED, tag
   `failure_reason`) and the others go on. Progress lines are printed as cells start and finish;
5. fits the scaling laws (memlayers.platform.laws) and writes the report (memlayers.dashboards),
   each guarded: if one is missing or fails, a warning and the table of results are printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from memlayers.platform.study import Cell, Study, expand

# A trial only drives its TorchTrainer (whose workers hold the CPUs/GPUs): no CPU, some memory.
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


@dataclass
class StudyResult:
    name: str
    workdir: Path
    tracking_uri: str
    parent_run_id: str
    cells: list[Cell]
    states: dict[str, str]              # cell id -> done | failed | ...
    results: dict[str, dict] = field(default_factory=dict)  # cell id -> what its trial reported
    laws: Optional[Path] = None
    report: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return all(state == "done" for state in self.states.values())


# ---- the Tune side --------------------------------------------------------------------------

def _cell_trainable(config: dict) -> None:
    """One Tune trial: train one run config with `run_training` and report how it ended."""
    import ray.tune

    from memlayers.platform.run_config import run_config_from_dict
    from memlayers.platform.trainer import run_training

    job = config["job"]
    try:
        result = run_training(run_config_from_dict(job["run"]), workdir=Path(job["workdir"]))
        report = {**{k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))},
                  "run_id": result.run_id, "status": result.status, "error": result.error or ""}
    except Exception as error:  # a crash outside the training loop: recorded by the controller
        report = {"run_id": "", "status": "FAILED", "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    ray.tune.report({**report, "key": job["key"]})


def max_concurrent(configs: list, resources: dict[str, float]) -> int:
    """How many of these runs fit on the cluster at once (at least one)."""
    fits = []
    for cfg in configs:
        r = cfg.resources
        fits.append(int(resources.get("CPU", 1) // max(r.workers * r.cpus_per_worker, 1e-9)))
        if r.gpus_per_worker > 0:
            fits.append(int(resources.get("GPU", 0) // (r.workers * r.gpus_per_worker)))
    return max(1, min(fits or [1]))


def run_jobs(jobs: dict, *, workdir: Path, label: str) -> dict[str, dict]:
    """Run `jobs` (key -> RunConfig) as Ray Tune trials; key -> the trial's final report."""
    if not jobs:
        return {}
    import ray
    import ray.tune

    concurrency = max_concurrent(list(jobs.values()), ray.cluster_resources())
    space = [{"key": key, "run": cfg.to_dict(), "workdir": str(workdir)} for key, cfg in jobs.items()]
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(_cell_trainable, TRIAL_RESOURCES),
        param_space={"job": ray.tune.grid_search(space)},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency,
                                        trial_name_creator=lambda t: f"{label}-{t.trial_id}",
                                        trial_dirname_creator=lambda t: f"{label}-{t.trial_id}"),
        run_config=ray.tune.RunConfig(name=f"{label}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(workdir / "tune"), verbose=0,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    results = {}
    for i in range(len(grid)):
        res = grid[i]
        key = (res.config or {}).get("job", {}).get("key")
        metrics = dict(res.metrics or {})
        if res.error is not None and not metrics.get("status"):
            metrics.update(status="FAILED", error=f"{type(res.error).__name__}: {res.error}".splitlines()[0][:500])
        if key is not None:
            results[key] = metrics
    return results


# ---- a local cluster dies with its driver --------------------------------------------------

@contextlib.contextmanager
def reaper(since: float, enabled: bool = True):
    """A watchdog process that kills the Ray processes this driver started if the driver dies
    without shutting them down (SIGKILL). Ray's agents would otherwise outlive the driver for a
    minute or more, retrying a GCS that is gone."""
    if not enabled:
        yield
        return
    code = f"from memlayers.platform.controller import reap; reap({os.getpid()}, {since!r})"
    watchdog = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            watchdog.stdin.write("done\n")
            watchdog.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)


def reap(driver_pid: int, since: float, interval: float = 0.5) -> None:
    """Watch `driver_pid`'s descendants started after `since`; kill them when the driver's pipe
    closes without "done" (the driver died)."""
    import psutil

    released = threading.Event()
    finished = threading.Event()

    def read() -> None:
        if sys.stdin.readline().strip() == "done":
            released.set()
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    known: dict[int, psutil.Process] = {}
    while not finished.wait(interval):
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(driver_pid).children(recursive=True):
                if child.pid != os.getpid() and child.create_time() >= since - 1:
                    known.setdefault(child.pid, child)
    if released.is_set():
        return
    for proc in known.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running():  # also checks the pid was not reused
                proc.kill()


# ---- MLflow bookkeeping ---------------------------------------------------------------------

def open_parent_run(study: Study, uri: str, workdir: Path) -> str:
    """The study's parent run: the existing one (tag memlayers.role=study) or a new one."""
    from memlayers.platform import tracking
    from memlayers.platform.progress import search_runs

    experiment_id = tracking.ensure_experiment(uri, study.name, workdir / "mlartifacts")
    runs = search_runs(uri, study.name, f"tags.`memlayers.role` = 'study' and tags.study = '{study.name}'")
    if runs:
        run_id = min(runs, key=lambda r: r.info.start_time or 0).info.run_id
        tracking.set_status(uri, run_id, "RUNNING")
        return run_id
    return tracking.create_run(uri, experiment_id, study.name, {"memlayers.role": "study", "study": study.name})


def log_definition(study: Study, cells: list[Cell], uri: str, run_id: str, workdir: Path) -> None:
    """The study file (as an artifact and `<workdir>/study.yaml`), its cells and its settings."""
    from memlayers.platform import tracking
    from memlayers.platform.tracking import client_for, with_retry

    client = client_for(uri)
    if study.file is not None:
        shutil.copyfile(study.file, workdir / "study.yaml")
        with_retry(lambda: client.log_artifact(run_id, str(study.file)))
    table = workdir / "cells.json"
    table.write_text(json.dumps([cell_row(c) for c in cells], indent=1))
    with_retry(lambda: client.log_artifact(run_id, str(table)))
    tracking.set_tags(uri, run_id, {"cells": len(cells), "budget_kind": study.budget.kind,
                                    "lr_mode": "tuned" if study.lr.tune else "fixed"})
    tracking.log_params(uri, run_id, {"grid": {"bases": study.grid.bases, "families": study.grid.families,
                                               "memory_sizes": study.grid.memory_sizes,
                                               "experts": study.grid.experts},
                                      "budget": study.budget.values(), "seeds": study.seeds,
                                      "data": study.data.to_dict()})


def cell_row(cell: Cell) -> dict:
    """A cell as a flat row (the `study validate` table, `cells.json`)."""
    return {"id": cell.id, "name": cell.name, "family": cell.family, "base": cell.base,
            "memory_slots": cell.memory_slots or 0, "experts": cell.experts or 0, "seed": cell.seed,
            "lr": cell.lr, "params": cell.params, "active_params": cell.active_params,
            "flops_per_token": cell.flops_per_token, "tokens": cell.tokens, "steps": cell.steps,
            "train_flops": cell.train_flops, "budget": cell.budget}


def record_failure(study: Study, cell: Cell, cfg, uri: str, reason: str) -> None:
    """Mark a cell's run FAILED with its reason (creating the run if the trial died before it)."""
    from memlayers.platform import tracking
    from memlayers.platform.progress import cell_runs, latest

    run = latest(cell_runs(uri, study.name).get(cell.id, []))
    if run is not None and run.status == "FINISHED":
        return
    if run is None:
        experiment_id = tracking.ensure_experiment(uri, study.name)
        tags = {**cfg.tracking.tags, "family": cell.family, "base": cell.base}
        run_id = tracking.create_run(uri, experiment_id, cell.name, tags, cfg.tracking.parent_run_id)
    else:
        run_id = run.run_id
    tracking.set_tags(uri, run_id, {"failure_reason": reason or "unknown"})
    tracking.set_status(uri, run_id, "FAILED")


# ---- the study ------------------------------------------------------------------------------

def run_study(study: Study, address: str | None = None, *, num_cpus: int | None = None,
              workdir: Path | None = None, out: Callable[[str], None] = print, fit: bool = True,
              report: bool = True, poll_interval: float = 2.0) -> StudyResult:
    """Run every unfinished cell of `study` (see the module docstring); returns where things are."""
    from memlayers.platform.progress import ProgressPrinter, cell_runs, cell_states, latest, summary_line
    from memlayers.platform.ray_session import ray_cluster, ray_env

    ray_env()
    if workdir is not None:
        study = dataclasses.replace(study, workdir=str(Path(workdir).resolve()))
    workdir = study.workdir_path()
    uri = study.tracking_uri()
    cells = expand(study)  # a budget that buys no step raises here, before anything is created
    workdir.mkdir(parents=True, exist_ok=True)
    import memlayers
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
        import ray

        starts_ray, started = address is None and not ray.is_initialized(), time.time()
        with ray_cluster(address, num_cpus=num_cpus), reaper(since=started, enabled=starts_ray):
            lrs = _learning_rates(study, todo, workdir, uri, parent, out)
            jobs = {}
            for cell in todo:
                previous = latest(runs.get(cell.id, []))
                jobs[cell.id] = cell.run_config(
                    workdir=workdir, tracking_uri=uri, parent_run_id=parent,
                    run_id=previous.run_id if previous is not None else None,
                    lr=lrs.get((cell.base, cell.family)), system_metrics=study.tracking.system_metrics)
                jobs[cell.id].tracking.tags.update(lr=f"{jobs[cell.id].train.lr:.6g}",
                                                   lr_source="tuned" if study.lr.tune else "fixed")
                if previous is not None:
                    out(f"  {cell.name}: continuing its unfinished run {previous.run_id}")
            with ProgressPrinter(uri, study.name, todo, out, poll_interval):
                results = run_jobs(jobs, workdir=workdir, label="cells")
            for cell in todo:
                result = results.get(cell.id, {"status": "FAILED", "error": "the trial reported nothing"})
                if result.get("status") != "FINISHED":
                    record_failure(study, cell, jobs[cell.id], uri, str(result.get("error") or "failed"))
                    out(f"  {cell.name}: FAILED: {result.get('error') or 'failed'}")
    states = cell_states([c.id for c in cells], cell_runs(uri, study.name))
    from memlayers.platform import tracking
    tracking.set_tags(uri, parent, {"cells_done": sum(s == "done" for s in states.values()),
                                    "cells_failed": sum(s == "failed" for s in states.values())})
    tracking.set_status(uri, parent, "FINISHED")
    out(f"study {study.name}: {summary_line(states)}")
    result = StudyResult(study.name, workdir, uri, parent, cells, states, results)
    if fit and study.fit.enabled:
        result.laws = fit_laws(study, uri, workdir, parent, out)
    if report and study.report:
        result.report = write_report(study, workdir, uri, out)
    _print_locations(result, out)
    return result


def _learning_rates(study: Study, todo: list[Cell], workdir: Path, uri: str, parent: str,
                    out: Callable[[str], None]) -> dict:
    if not study.lr.tune:
        return {}
    from memlayers.platform.tuning import tune_learning_rates

    return tune_learning_rates(study, todo, workdir=workdir, tracking_uri=uri, parent_run_id=parent, out=out,
                               run_jobs=lambda jobs: run_jobs(jobs, workdir=workdir, label="tuning"))


def fit_laws(study: Study, uri: str, workdir: Path, parent: str, out: Callable[[str], None]) -> Optional[Path]:
    """Fit the study's laws to its finished runs into `<workdir>/laws/laws.json` (logged to the
    parent run); on any problem print a warning and the table of results instead."""
    try:
        from memlayers.platform.laws.io import dumps
        from memlayers.platform.laws.mlflow_runs import load_study_rows, log_laws_artifact
        from memlayers.platform.laws.study import fit_study

        rows = load_study_rows(study.name, uri)
        laws = fit_study(rows, bootstrap=study.fit.bootstrap)
        keep = {"compute": ("compute_laws", "multipliers"), "memory": ("memory_laws",), "recall": ("memory_laws",)}
        wanted = {section for law in study.fit.laws for section in keep[law]}
        for section in ("compute_laws", "multipliers", "memory_laws"):
            if section not in wanted:
                laws.pop(section, None)
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
        return path
    except Exception as error:
        out(f"warning: scaling-law fit unavailable ({type(error).__name__}: {error}); the results:")
        for line in results_table(study.name, uri):
            out(line)
        return None


def write_report(study: Study, workdir: Path, uri: str, out: Callable[[str], None]) -> Optional[Path]:
    """The HTML report via memlayers.dashboards.report, if that module is installed."""
    try:
        import importlib

        module = importlib.import_module("memlayers.dashboards.report")
        from memlayers.platform.study_ref import StudyRef

        ref = StudyRef(study.name, workdir, uri, study.file)
        path = module.write_report(ref)
        return Path(path) if path else None
    except Exception as error:
        out(f"warning: report not written ({type(error).__name__}: {error})")
        return None


def results_table(study: str, uri: str) -> list[str]:
    """One line per cell run: name, status, final val_loss / qa_exact_match / loss."""
    from memlayers.platform.progress import cell_runs, latest

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
