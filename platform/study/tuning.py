"""Learning-rate tuning with Optuna: a few short trials per (base, family), best lr reused by the cells.

Each (base, family) group of a study with `lr: {tune: true, ...}` gets an Optuna study named
`<study>:<base>:<family>` (TPE sampler, storage `sqlite:///<workdir>/optuna.db`, so tuning resumes
where it stopped). Trials train the group's first cell for `lr.steps` steps at a log-uniform lr from
`lr.range` and minimise `lr.metric` (the final `val_loss`, falling back to the training `loss`).
Trials of all groups run together, one round at a time, through the controller's job runner; each is
an MLflow run tagged `memlayers.role=tuning` under the study's parent run (not a cell). A trial left
running by a killed driver is marked failed in Optuna and KILLED in MLflow on the next start: only the
controller that holds the study tunes (lease.py), so a RUNNING tuning run it finds is a dead one's, never
a live controller's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from memlayers.platform.study.cells import Cell, cells_by
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.schema import Study
from memlayers.platform.tracking.client import set_status
from memlayers.platform.tracking.conventions import tuning_run_name

if TYPE_CHECKING:
    from memlayers.platform.train.run_config import RunConfig

Runner = Callable[[dict[str, "RunConfig"]], dict[str, dict]]  # {key: run config} -> {key: final report}
GROUP_SEED = 0


def optuna_storage(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'optuna.db').resolve()}"


def trial_steps(study: Study, cell: Cell) -> int:
    """Steps of one tuning trial: `lr.steps`, else a tenth of the cell's (at least 10, at most all)."""
    steps = study.lr.steps or max(10, (cell.steps or 10) // 10)
    return max(1, min(steps, cell.steps or steps))


def objective(result: dict, metric: str) -> float | None:
    """The value a finished trial minimises; None if it failed or logged nothing usable."""
    if result.get("status") != "FINISHED":
        return None
    for key in (metric, "loss"):
        value = result.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def tune_learning_rates(study: Study, cells: list[Cell], *, workdir: Path, tracking_uri: str,
                        parent_run_id: str | None, run_jobs: Runner,
                        out: Callable[[str], None] = print) -> dict[tuple[str, str], float]:
    """Best lr per (base, family) of `cells`; groups whose every trial failed get the train default."""
    import optuna  # deferred: optuna is heavy and only this path needs it
    from optuna.trial import TrialState  # deferred: optuna is heavy and only this path needs it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _kill_stale_runs(study, tracking_uri)
    storage = optuna_storage(workdir)
    groups = cells_by(cells, lambda c: (c.base, c.family))
    studies = {}
    for (base, family) in groups:
        sampler = optuna.samplers.TPESampler(seed=GROUP_SEED)
        studies[(base, family)] = optuna.create_study(study_name=f"{study.name}:{base}:{family}", storage=storage,
                                                      direction="minimize", sampler=sampler, load_if_exists=True)
    for ostudy in studies.values():
        for trial in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            ostudy.tell(trial.number, state=TrialState.FAIL)

    def finished(key) -> int:
        return len(studies[key].get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))

    low, high = study.lr.range
    while True:
        todo = [key for key in studies if finished(key) < study.lr.trials]
        if not todo:
            break
        asked, jobs = {}, {}
        for base, family in todo:
            trial = studies[(base, family)].ask()
            lr = trial.suggest_float("lr", low, high, log=True)
            cell = groups[(base, family)][0]
            key = f"tune:{base}:{family}:{trial.number}"
            cfg = cell.run_config(workdir=workdir, tracking_uri=tracking_uri, parent_run_id=parent_run_id, lr=lr,
                                  steps=trial_steps(study, cell), role="tuning",
                                  run_name=tuning_run_name(family, base, trial.number),
                                  system_metrics=study.tracking.system_metrics, storage=study.storage)
            cfg.tracking.tags.update({"tuning_group": f"{base}/{family}", "optuna_trial": str(trial.number),
                                      "lr": f"{lr:.6g}"})
            asked[key], jobs[key] = (studies[(base, family)], trial), cfg
        out(f"lr tuning: {len(jobs)} trial(s): " + ", ".join(f"{j.name} lr={j.train.lr:.3g}" for j in jobs.values()))
        results = run_jobs(jobs)
        for key, (ostudy, trial) in asked.items():
            value = objective(results.get(key, {}), study.lr.metric)
            if value is None:
                ostudy.tell(trial, state=TrialState.FAIL)
            else:
                ostudy.tell(trial, value)
    best = {}
    for (base, family), ostudy in studies.items():
        complete = ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            best[(base, family)] = float(ostudy.best_params["lr"])
            out(f"lr tuning: {family} on {base}: best lr {best[(base, family)]:.4g} "
                f"({study.lr.metric} {ostudy.best_value:.4g}, {len(complete)} trials)")
        else:
            best[(base, family)] = study.train.lr
            out(f"warning: lr tuning of {family} on {base}: every trial failed; using train.lr={study.train.lr:g}")
    return best


def _kill_stale_runs(study: Study, tracking_uri: str) -> None:
    """Tuning runs a killed driver left RUNNING are KILLED (their trials are failed in Optuna); called
    by the controller holding the study, so no live controller's run is among them."""
    for runs in cell_runs(tracking_uri, study.name, role="tuning").values():
        for run in runs:
            if run.status == "RUNNING":
                set_status(tracking_uri, run.run_id, "KILLED")
