"""`memlayers train RUN.yaml`: one training run on a local Ray (or `--address`), tracked in MLflow."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a run config YAML (see studies/runs/)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (overrides resources.workers)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the run's workdir)")
    parser.add_argument("--address", help="an existing Ray cluster ('auto' or ray://HOST:10001); default: local")
    parser.add_argument("--workdir", help="where checkpoints, data cache and the default MLflow store go")
    parser.add_argument("--storage", help="where checkpoints go: s3://bucket/prefix, gs://..., or a path every node "
                                          "shares (overrides the config's storage)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=50 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, resolve the budget and print the plan; start neither Ray nor MLflow")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memlayers.config_schema import ConfigError
    from memlayers.platform.train.run_config import load_run_config

    overrides = list(args.set)
    if args.workers is not None:
        overrides.append(f"resources.workers={args.workers}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.storage:
        overrides.append(f"storage={args.storage}")
    try:
        cfg = load_run_config(args.config, overrides)
        cfg.model.validate()
    except ConfigError as error:
        print(f"memlayers train: {args.config}: {error}", file=sys.stderr)
        return 2
    from memlayers.platform.cluster.secrets import credential_problems

    problems = credential_problems({"storage": cfg.storage, "tracking.uri": cfg.tracking.uri,
                                    "data.path": cfg.data.path})
    for field, reason in problems:  # they would be written to MLflow, checkpoints and printed lines
        print(f"memlayers train: {args.config}: {field}: {reason}", file=sys.stderr)
    if problems:
        return 2

    if args.dry_run:
        return print_plan(cfg, args.config)
    if cfg.resources.gpus_per_worker > 0 and planned(cfg, args.config) is None:  # refused before Ray starts
        return 2

    from memlayers.platform.cluster.session import ray_cluster, session_dir_problem
    from memlayers.platform.cluster.visibility import shared_problems
    from memlayers.platform.tracking.conventions import sqlite_uri
    from memlayers.platform.train.launcher import resolve_workdir, run_training, storage_root

    if problem := session_dir_problem(args.address):
        print(f"memlayers train: {problem}", file=sys.stderr)
        return 2
    workdir = resolve_workdir(cfg, Path(args.workdir) if args.workdir else None)
    with ray_cluster(args.address, num_cpus=None):
        problems = shared_problems(cfg.tracking.uri or sqlite_uri(workdir), storage_root(cfg, workdir))
        for problem in problems:  # refused before the run starts: some node cannot reach it
            print(f"memlayers train: {args.config}: {problem}", file=sys.stderr)
        if problems:
            return 2
        result = run_training(cfg, workdir=workdir)
    print(f"run {result.run_id}: {result.status}")
    for key in ("loss", "val_loss", "qa_exact_match", "qa_answer_nll", "train_flops"):
        if key in result.metrics:
            print(f"  {key} = {result.metrics[key]:.6g}")
    print(f"  MLflow: {cfg.tracking.uri or f'sqlite:///{workdir}/mlflow.db'} "
          f"(experiment {cfg.tracking.experiment or cfg.name})")
    if result.error:
        print(f"  error: {result.error}", file=sys.stderr)
    return 0 if result.status == "FINISHED" else 1


def planned(cfg, source: str):
    """(the run's plan, its per-GPU memory plan), or None after printing the config error naming its field."""
    from memlayers.config_schema import ConfigError
    from memlayers.platform.data.vocab import vocab_size_of
    from memlayers.platform.train.loop import plan_run
    from memlayers.platform.train.memory_plan import check_memory_plan

    try:
        plan = plan_run(cfg, vocab_size_of(cfg.data))
        return plan, check_memory_plan(cfg, plan.model)
    except ConfigError as error:
        print(f"memlayers train: {source}: {error}", file=sys.stderr)
        return None


def print_plan(cfg, source: str) -> int:
    """The run's plan: the model's accounting, steps, tokens, training FLOPs and memory per GPU (exit 0),
    or the config error naming its field (exit 2)."""
    found = planned(cfg, source)
    if found is None:
        return 2
    plan, memory = found
    acc = plan.accounting
    rows = [("run", cfg.name), ("model", f"{cfg.model.family} on {cfg.model.base}"),
            ("vocabulary", f"{plan.model.vocab_size:,}"),
            ("total params", f"{acc.total_params:,}"), ("embedding params", f"{acc.embedding_params:,}"),
            ("memory value params", f"{acc.memory_value_params:,}"), ("active params", f"{acc.active_params:,}"),
            ("train FLOPs/token", f"{acc.train_flops_per_token:,}"),
            ("budget", "{} = {:g}".format(*cfg.train.budget())),
            ("steps", f"{plan.steps:,}"), ("tokens/step", f"{plan.tokens_per_step:,}"),
            ("tokens", f"{plan.tokens:,}"), ("train FLOPs", f"{plan.train_flops:.4g}"),
            ("workers", f"{cfg.resources.workers} (memory_parallel {cfg.resources.memory_parallel})"),
            ("memory per GPU", memory.summary())]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
