"""The evaluation tasks: our harness task configs for factual QA, and any installed harness task.

Our tasks (`OWN_TASKS`) are inline lm-evaluation-harness configs over local files, with the
harness's own prompts, stop sequences, filters and exact-match normalisation (its nq_open and
triviaqa YAMLs), read from `--data-dir DIR`:

    nq_open/validation.jsonl    {"question": str, "answer": [str, ...]}
    triviaqa/validation.jsonl   {"question": str, "answer": {"value": str, "aliases": [str, ...]}}

Each is two harness tasks: a `generate_until` one (exact match; for triviaqa also token F1, the
paper's metric) and a `loglikelihood` one, `<task>_nll`, scoring the first gold answer after the
same prompt (answer NLL: minus its summed log-likelihood, averaged over questions). A data file
is checked line by line before the harness reads it (`check_data_file`): a malformed line is one
error naming the file, the line and the field, not a dataset-builder or template traceback. `facts_qa` is
the synthetic world's QA split as ONE loglikelihood task: `is_greedy` is exactly the training
loop's exact match (greedy decoding of the answer's tokens gives them) and minus the
log-likelihood its answer NLL. Any other name is looked up in the harness's task index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from memlayers.platform.eval.metrics import exact_match, token_f1

DATA_FILES: dict[str, str] = {"nq_open": "nq_open/validation.jsonl", "triviaqa": "triviaqa/validation.jsonl"}
OWN_TASKS: tuple[str, ...] = ("nq_open", "triviaqa", "facts_qa")
FACTUAL_METRICS: tuple[str, ...] = ("exact_match", "f1", "answer_nll")
STOP = ["\n", ".", ","]                      # the harness's `until` for nq_open and triviaqa
NQ_ARTICLES = [r"\b(?:The |the |An |A |The |a |an )"]   # nq_open's regexes_to_ignore


class EvalInputError(ValueError):
    """Bad evaluation input (a task, a data file, a target): one line naming it."""


@dataclass
class HarnessTask:
    """One harness task (an inline config or a registered name) and which task it reports for."""

    task: str                           # the task we report, e.g. nq_open
    spec: Any                           # an inline config dict, or a registered task name
    own: bool = True                    # our config (metric names are ours) or the harness's
    limit_applies: bool = True          # whether --limit reaches the harness (facts_qa selects itself)
    docs: list[dict] = field(default_factory=list)


def _first(filtered: Sequence) -> str:
    return filtered[0] if isinstance(filtered, (list, tuple)) else filtered


def _nq_results(doc: dict, results: list) -> dict[str, float]:
    return {"exact_match": exact_match(_first(results), doc["answer"], regexes_to_ignore=NQ_ARTICLES)}


def _triviaqa_results(doc: dict, results: list) -> dict[str, float]:
    aliases = list(doc["answer"]["aliases"]) or [doc["answer"]["value"]]
    prediction = _first(results)
    return {"exact_match": exact_match(prediction, aliases), "f1": token_f1(prediction, aliases)}


def _nll_results(doc: dict, results: list) -> dict[str, float]:
    logprob, _ = results[0]
    return {"answer_nll": -float(logprob)}


def _facts_results(doc: dict, results: list) -> dict[str, float]:
    logprob, is_greedy = results[0]
    return {"exact_match": float(is_greedy), "answer_nll": -float(logprob)}


def _metric_list(names: Sequence[str]) -> list[dict]:
    return [{"metric": n, "aggregation": "mean", "higher_is_better": n != "answer_nll"} for n in names]


def _local(task: str, path: Path, **config) -> dict:
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(path)}},
            "validation_split": "validation", "fewshot_split": "validation", "target_delimiter": " ",
            "fewshot_delimiter": "\n", **config}


def _generate(task: str, path: Path, text: str, target: str, results: Callable, metrics: Sequence[str],
              description: str = "") -> dict:
    return _local(task, path, output_type="generate_until", doc_to_text=text, doc_to_target=target,
                  description=description, process_results=results, metric_list=_metric_list(metrics),
                  generation_kwargs={"until": list(STOP), "do_sample": False, "temperature": 0.0},
                  filter_list=[{"name": "remove_whitespace",
                                "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}])


def _likelihood(task: str, path: Path, text: str, target: str, description: str = "") -> dict:
    return _local(task, path, output_type="loglikelihood", doc_to_text=text, doc_to_target=target,
                  description=description, process_results=_nll_results, metric_list=_metric_list(["answer_nll"]))


def data_file(task: str, data_dir: str | Path | None) -> Path:
    """The local file a factual task reads; EvalInputError naming it when it is missing."""
    if data_dir is None:
        raise EvalInputError(f"task {task}: needs --data-dir DIR holding {DATA_FILES[task]}")
    path = Path(data_dir) / DATA_FILES[task]
    if not path.is_file():
        raise EvalInputError(f"task {task}: data file {path} not found (--data-dir {data_dir})")
    return path.resolve()


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _doc_problem(task: str, doc: Any) -> str | None:
    """What is wrong with one question of `task`'s data file (the fields its prompts and metrics read)."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    if not isinstance(doc.get("question"), str) or not doc["question"].strip():
        return f"question: expected a non-empty string, got {doc.get('question')!r:.60}"
    answer = doc.get("answer")
    if task == "nq_open" and not _strings(answer):
        return f"answer: expected a non-empty list of strings, got {answer!r:.60}"
    if task == "triviaqa":
        if not isinstance(answer, dict):
            return f'answer: expected {{"value": str, "aliases": [str, ...]}}, got {answer!r:.60}'
        if not isinstance(answer.get("value"), str) or not answer["value"]:
            return f"answer.value: expected a non-empty string, got {answer.get('value')!r:.60}"
        if not _strings(answer.get("aliases")):
            return f"answer.aliases: expected a non-empty list of strings, got {answer.get('aliases')!r:.60}"
    return None


def check_data_file(task: str, path: Path) -> None:
    """EvalInputError naming the file, line and field of the first malformed line of `task`'s data."""
    questions = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                where = f"task {task}: {path}:{number}"
                if not line.strip():
                    raise EvalInputError(f"{where}: empty line (one JSON object per line)")
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EvalInputError(f"{where}: not JSON ({error.msg})") from None
                problem = _doc_problem(task, doc)
                if problem:
                    raise EvalInputError(f"{where}: {problem}")
                questions += 1
    except (OSError, UnicodeDecodeError) as error:
        raise EvalInputError(f"task {task}: {path}: cannot read ({error})") from None
    if not questions:
        raise EvalInputError(f"task {task}: {path}: no questions")


def factual_tasks(task: str, data_dir: str | Path | None) -> list[HarnessTask]:
    """The harness tasks of nq_open or triviaqa (their prompts as in the harness's YAMLs)."""
    path = data_file(task, data_dir)
    if task == "nq_open":
        text, description = "Q: {{question}}?\nA:", "Answer these questions:\n\n"
        generate = _generate("nq_open", path, text, "{{answer}}", _nq_results, ["exact_match"], description)
        nll = _likelihood("nq_open_nll", path, text, " {{answer[0]}}", description)
    else:
        text = "Question: {{question}}?\nAnswer:"
        generate = _generate("triviaqa", path, text, "{{answer.aliases}}", _triviaqa_results, ["exact_match", "f1"])
        nll = _likelihood("triviaqa_nll", path, text, " {{answer.value}}")
    return [HarnessTask(task, generate), HarnessTask(task, nll)]


def facts_task(docs: list[dict]) -> HarnessTask:
    """facts_qa over `docs` ({"prompt", "answer"}: the QA items the caller selected)."""
    def dataset(**_: Any):
        import datasets  # deferred: datasets is heavy and only this task builds a dataset in memory
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})

    config = {"task": "facts_qa", "custom_dataset": dataset, "validation_split": "validation",
              "fewshot_split": "validation", "output_type": "loglikelihood", "doc_to_text": "{{prompt}}",
              "doc_to_target": " {{answer}}", "target_delimiter": " ", "fewshot_delimiter": " ",
              "process_results": _facts_results, "metric_list": _metric_list(["exact_match", "answer_nll"])}
    return HarnessTask("facts_qa", config, limit_applies=False, docs=docs)


def parse_tasks(text: str) -> list[str]:
    """'nq_open,triviaqa' -> ['nq_open', 'triviaqa']; EvalInputError when empty or repeated."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise EvalInputError("--tasks: name at least one task (nq_open, triviaqa, facts_qa, or a harness task)")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise EvalInputError(f"--tasks: task {name} named twice")
    return names
