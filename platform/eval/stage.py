"""Evaluating targets and logging their scores; the study's evaluation stage on Ray.

`evaluate_targets` is what `memlayers eval` runs: every problem with the input is raised before
a model is loaded (tasks, data files, checkpoints, facts_qa on a run without facts), then each
target is evaluated, and only when all succeeded are the scores logged, to each target's MLflow
run as `eval/<task>/<metric>`. `run_eval_stage` is the stage a study's `eval` section adds: one
Ray task per finished cell whose run does not yet have a score of every task (so a resumed
study evaluates only what is missing), on the cell's final checkpoint; the driver logs. The
driver waits at most `eval.timeout_s` for the next cell's scores; past it the evaluations still
running are cancelled and named, and the study goes on (a resumed study evaluates them again).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from memlayers.platform.eval.loading import load_trained, read_meta
from memlayers.platform.eval.runner import Score, check_tasks, evaluate_model, task_manager
from memlayers.platform.eval.targets import Target, cell_targets
from memlayers.platform.eval.tasks import EvalInputError
from memlayers.platform.tracking.client import log_metrics
from memlayers.platform.tracking.conventions import eval_metric, eval_tasks_logged

EVAL_TASK_CPUS = 1


def check_targets(targets: Sequence[Target], names: Sequence[str]) -> None:
    """EvalInputError for a checkpoint that cannot be loaded or cannot run the tasks."""
    for target in targets:
        meta = read_meta(target.checkpoint)
        if "facts_qa" in names and (meta["run"].get("data") or {}).get("source", "facts") != "facts":
            raise EvalInputError(f"task facts_qa: {target.name or target.checkpoint} was not trained on "
                                 "synthetic facts")


def evaluate_target(target: Target, names: Sequence[str], *, data_dir: str | None = None, limit: int | None = None,
                    num_fewshot: int | None = None, batch_size: int = 32, threads: int | None = None) -> list[Score]:
    """The scores of one checkpoint (see runner.evaluate_model)."""
    if threads:
        import torch  # deferred: only a Ray task sets its own thread count
        torch.set_num_threads(threads)
    trained = load_trained(target.checkpoint)
    return evaluate_model(trained, names, data_dir=data_dir, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size, manager=task_manager(names))


def log_scores(target: Target, scores: Sequence[Score]) -> None:
    if target.run_id is not None and target.tracking_uri is not None and scores:
        log_metrics(target.tracking_uri, target.run_id, {eval_metric(s.task, s.metric): s.value for s in scores})


def evaluate_targets(targets: Sequence[Target], names: Sequence[str], *, log: bool = True,
                     **options) -> list[tuple[Target, list[Score]]]:
    """Check everything, evaluate every target, then log (see the module docstring)."""
    check_tasks(names, options.get("data_dir"))
    check_targets(targets, names)
    results = [(target, evaluate_target(target, names, **options)) for target in targets]
    if log:
        for target, scores in results:
            log_scores(target, scores)
    return results


def pending(targets: Sequence[Target], names: Sequence[str]) -> list[Target]:
    """Targets whose run lacks a score of at least one task."""
    return [t for t in targets if not set(names) <= eval_tasks_logged(t.logged)]


def _remote_evaluate(target: Target, names: list[str], options: dict) -> list[Score]:
    return evaluate_target(target, names, threads=EVAL_TASK_CPUS, **options)


def run_eval_stage(study: str, tracking_uri: str, eval_cfg, out: Callable[[str], None] = print) -> int:
    """Evaluate the finished cells that lack scores; returns how many were evaluated. Ray must be
    initialised (the controller's cluster). A problem is printed and ends the stage, not the study."""
    import ray  # deferred: ray is heavy and only the study stage needs it

    names, options = list(eval_cfg.tasks), eval_cfg.options()
    try:
        todo = pending(cell_targets(study, tracking_uri), names)
        if not todo:
            out("eval: every finished cell already has its scores")
            return 0
        check_tasks(names, options.get("data_dir"))
        check_targets(todo, names)
    except EvalInputError as error:
        out(f"warning: eval stage skipped: {error}")
        return 0
    started = time.time()
    task = ray.remote(num_cpus=EVAL_TASK_CPUS)(_remote_evaluate)
    running = {task.remote(target, names, options): target for target in todo}
    done = 0
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=eval_cfg.timeout_s)
        if not ready:
            for ref in running:
                ray.cancel(ref, force=True)
            out(f"  eval: no scores came in {eval_cfg.timeout_s:g} s (eval.timeout_s); cancelled the evaluation of "
                + ", ".join(str(t.name) for t in running.values()))
            break
        target = running.pop(ready[0])
        try:
            scores = ray.get(ready[0])
        except Exception as error:  # a task that failed: reported, the other cells go on
            out(f"  eval {target.name}: FAILED: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        log_scores(target, scores)
        done += 1
        out(f"  eval {target.name}: " + ", ".join(f"{s.task}/{s.metric}={s.value:.4g}" for s in scores))
    out(f"eval: {done}/{len(todo)} cells evaluated on {', '.join(names)} in {time.time() - started:.0f} s")
    return done
