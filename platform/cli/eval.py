"""`memlayers eval TARGET --tasks T1,T2`: downstream tasks on trained checkpoints, logged to MLflow.

    memlayers eval runs/smoke/...checkpoint_000001 --tasks facts_qa
    memlayers eval studies/smoke.yaml --tasks facts_qa --limit 32 --json
    memlayers eval RUN_ID --tracking-uri sqlite:///runs/x/mlflow.db --tasks nq_open,triviaqa --data-dir DIR

TARGET: a checkpoint folder, an MLflow run id (`--tracking-uri`), or a study (file or name: every
finished cell). Tasks: nq_open, triviaqa (from `--data-dir DIR`: nq_open/validation.jsonl,
triviaqa/validation.jsonl), facts_qa (the run's own QA split) and any installed lm_eval task.
Bad input (an unknown task, a missing file, a TARGET that names nothing) is one line on stderr,
exit 2, before anything is loaded or logged.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a checkpoint folder, an MLflow run id, or a study file or name")
    parser.add_argument("--tasks", required=True, help="comma-separated: nq_open,triviaqa,facts_qa,hellaswag,...")
    parser.add_argument("--data-dir", help="holds nq_open/validation.jsonl and triviaqa/validation.jsonl")
    parser.add_argument("--limit", type=int,
                        help="score only N items per task (facts_qa: the N the training loop scores)")
    parser.add_argument("--num-fewshot", type=int,
                        help="few-shot examples per prompt (default: the task's, 0 for ours)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study's, or $MLFLOW_TRACKING_URI)")
    parser.add_argument("--no-log", action="store_true", help="print the scores without logging them to MLflow")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {run_id, task, metric, value}")
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"memlayers eval: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from memlayers.platform.eval.stage import evaluate_targets  # deferred: torch and lm_eval only for this command
    from memlayers.platform.eval.targets import resolve_targets
    from memlayers.platform.eval.tasks import EvalInputError, parse_tasks

    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit: must be >= 1, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        return _fail(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    try:
        names = parse_tasks(args.tasks)
        targets = resolve_targets(args.target, args.tracking_uri)
        results = evaluate_targets(targets, names, log=not args.no_log, data_dir=args.data_dir, limit=args.limit,
                                   num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    except EvalInputError as error:
        return _fail(str(error))
    rows = [{"run_id": target.run_id, "task": s.task, "metric": s.metric, "value": s.value}
            for target, scores in results for s in scores]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'run':<36} {'task':<20} {'metric':<14} {'value':>10}")
    for (target, scores) in results:
        for s in scores:
            print(f"{(target.name or str(target.checkpoint))[:36]:<36} {s.task:<20} {s.metric:<14} {s.value:>10.4f}")
    return 0
