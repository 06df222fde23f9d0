"""Run tasks on one trained model through `lm_eval.simple_evaluate`; scores as plain rows.

`check_tasks(names, data_dir)` refuses, before any model is loaded or anything is logged, an
unknown task, a missing or malformed data file, or a harness task whose data cannot be reached (offline:
neither in the datasets cache nor readable from --data-dir). `evaluate_model(trained, names, ...)`
builds the harness tasks (tasks.py), runs them with `MemlayersLM`, and maps the harness's
results onto `Score(task, metric, value)`: our metric names for our tasks, the harness's own
(`acc`, `acc_norm`, `<metric>_<filter>` for a filter other than none) for the others.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import lm_eval
from lm_eval.tasks import TaskManager

from memlayers.platform.data.qa import select_items
from memlayers.platform.eval.lm_adapter import MemlayersLM
from memlayers.platform.eval.loading import TrainedModel
from memlayers.platform.eval.tasks import (
    OWN_TASKS,
    EvalInputError,
    HarnessTask,
    check_data_file,
    data_file,
    facts_task,
    factual_tasks,
)

logging.getLogger("lm_eval").setLevel(logging.WARNING)
SKIPPED_RESULT_KEYS = ("alias", "name", "sample_len", " ")


@dataclass(frozen=True)
class Score:
    task: str
    metric: str
    value: float

    def to_dict(self) -> dict:
        return asdict(self)


def task_manager(names: Sequence[str]) -> TaskManager:
    """The harness's task index when a harness task is named (it takes seconds), else an empty one."""
    return TaskManager(include_defaults=any(n not in OWN_TASKS for n in names))


def check_tasks(names: Sequence[str], data_dir: str | Path | None, manager: TaskManager | None = None) -> TaskManager:
    """EvalInputError naming the first task that cannot run (see the module docstring)."""
    manager = manager or task_manager(names)
    for name in names:
        if name in DATA_TASKS:
            check_data_file(name, data_file(name, data_dir))
        elif name != "facts_qa":
            if name not in manager.all_tasks:
                raise EvalInputError(f"unknown task {name} (ours: {', '.join(OWN_TASKS)}; "
                                     "or an installed lm_eval task, "
                                     "e.g. hellaswag, piqa, mmlu)")
            try:
                manager.load([name])
            except Exception as error:  # datasets: ConnectionError / DatasetNotFoundError / OSError offline
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                raise EvalInputError(f"task {name}: its data is not reachable ({reason}); offline, only tasks read "
                                     f"from --data-dir ({', '.join(DATA_TASKS)}) "
                                     "or in the datasets cache run") from None
    return manager


DATA_TASKS: tuple[str, ...] = ("nq_open", "triviaqa")


def facts_docs(trained: TrainedModel, limit: int | None) -> list[dict]:
    """The facts_qa documents: the QA items the training loop scores with qa_eval_items=limit."""
    items = trained.qa_items()
    if not items:
        raise EvalInputError(f"task facts_qa: {trained.directory} was not trained on synthetic facts "
                             f"(data.source {trained.run.data.source})")
    return [{"prompt": item.prompt, "answer": item.answer} for item in select_items(items, limit)]


def harness_tasks(names: Sequence[str], trained: TrainedModel | None, data_dir: str | Path | None,
                  limit: int | None) -> list[HarnessTask]:
    out: list[HarnessTask] = []
    for name in names:
        if name in DATA_TASKS:
            out += factual_tasks(name, data_dir)
        elif name == "facts_qa":
            if trained is None:
                raise EvalInputError("task facts_qa: needs a trained checkpoint (its QA split)")
            out.append(facts_task(facts_docs(trained, limit)))
        else:
            out.append(HarnessTask(name, name, own=False))
    return out


def _metric_name(key: str) -> str | None:
    metric, _, filter_name = key.partition(",")
    if metric.endswith("_stderr") or key in SKIPPED_RESULT_KEYS:
        return None
    return metric if filter_name in ("", "none", "remove_whitespace") else f"{metric}_{filter_name}"


def scores_of(results: dict, tasks: Sequence[HarnessTask]) -> list[Score]:
    """The harness's `results` section as Scores, in the order of `tasks`."""
    own = {t.spec["task"]: t.task for t in tasks if t.own}
    out = []
    for harness_name, values in results.items():
        for key, value in values.items():
            metric = _metric_name(key)
            if metric is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(Score(own.get(harness_name, harness_name), metric, float(value)))
    order = {t.task: i for i, t in enumerate(tasks)}
    return sorted(out, key=lambda s: (order.get(s.task, len(order)), s.task, s.metric))


def evaluate_model(trained: TrainedModel | None, names: Sequence[str], *, data_dir: str | Path | None = None,
                   limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 32,
                   manager: TaskManager | None = None, lm: MemlayersLM | None = None) -> list[Score]:
    """Scores of `trained` on the tasks `names` (see the module docstring); `lm` replaces the
    adapter of `trained` (then `trained` may be None unless facts_qa is asked)."""
    manager = manager or task_manager(names)
    tasks = harness_tasks(names, trained, data_dir, limit)
    lm = lm or MemlayersLM(trained.model, trained.tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(model=lm, tasks=[t.spec for t in tasks], task_manager=manager,
                                     num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                                     log_samples=False, verbosity="WARNING")
    return scores_of(output["results"], tasks)
