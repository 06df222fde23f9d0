"""`memlayers study validate|run|submit|status|reference`: the study commands.

    memlayers study validate FILE                   every problem, one per line (exit 2), or the cells
    memlayers study run FILE [--address auto|ray://HOST:10001] [--workdir DIR] [--num-cpus N] [--storage URI]
                             [--tracking-uri URI]
    memlayers study submit FILE --address http://HEAD:8265 [--storage URI] [--tracking-uri URI] [--workdir DIR] [--wait]
                                [--wait-timeout S] [--env NAME ...] [--ship-secret NAME ...]
    memlayers study status FILE|NAME [--tracking-uri URI] [--storage URI]
    memlayers study reference [--write PATH]        the study-file reference, generated from the schema

A study that does not validate is refused before anything starts (no Ray, no MLflow, no files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = actions.add_parser("validate", help="check a study file and print its cells")
    validate.add_argument("file", help="a study YAML (see studies/)")
    validate.add_argument("--json", action="store_true", help="print the cells as a JSON list")
    _add_seeds(validate)
    validate.set_defaults(func=run_validate)

    run = actions.add_parser("run", help="run a study's unfinished cells (local Ray unless --address)")
    run.add_argument("file", help="a study YAML")
    run.add_argument("--address", help="an existing Ray cluster ('auto', ray://HOST:10001); default: start one here")
    run.add_argument("--workdir", help="where MLflow, checkpoints and caches go (default: the study's, ./runs/NAME)")
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    _add_cluster_settings(run)
    run.add_argument("--no-fit", action="store_true", help="skip the scaling-law fit after the grid")
    run.add_argument("--no-report", action="store_true", help="skip the HTML report after the grid")
    _add_seeds(run)
    run.set_defaults(func=run_run)

    submit = actions.add_parser("submit", help="submit a study to a Ray cluster as a Ray Job")
    submit.add_argument("file", help="a study YAML")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, http://HEAD:8265")
    submit.add_argument("--workdir", help="the study's work directory on the cluster (an absolute path; "
                                          "default ~/memlayers/runs/NAME on the head node)")
    _add_cluster_settings(submit)
    submit.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    submit.add_argument("--wait-timeout", type=float, default=WAIT_TIMEOUT_S, metavar="S",
                        help=f"with --wait: stop following after S seconds (the job goes on; default "
                             f"{WAIT_TIMEOUT_S:.0f}, 0 = no limit)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="ship this variable's value from here to the job (repeatable); by default the job "
                             "carries none: the nodes' own environment holds endpoints and credentials")
    submit.add_argument("--ship-secret", action="append", default=[], metavar="NAME",
                        help="ship a variable that looks like a secret (a job's variables are shown by the Ray "
                             "dashboard and `ray job list`)")
    submit.set_defaults(func=run_submit)

    status = actions.add_parser("status", help="cells done / running / failed / pending, from MLflow")
    status.add_argument("study", help="a study file or a study name (looked up in ./runs/NAME)")
    status.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study's)")
    status.add_argument("--storage", help="the study's storage root (s3://bucket/prefix), for its table of cells")
    status.set_defaults(func=run_status)

    reference = actions.add_parser("reference", help="the study-file reference (Markdown), generated from the schema")
    reference.add_argument("--write", metavar="PATH", help="write it to PATH (docs/study-file.md) instead of printing")
    reference.set_defaults(func=run_reference)


WAIT_TIMEOUT_S = 7 * 24 * 3600.0  # `submit --wait` follows a job at most a week unless told otherwise


def _add_cluster_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="where checkpoints, laws, report and the study's copy go: "
                                          "s3://bucket/prefix, "
                                          "gs://..., or a path every node shares (overrides the study's storage)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, e.g. http://HOST:5000 (overrides tracking.uri)")


def _add_seeds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", help="other seeds than the study's, e.g. 3,4,5: runs as the study "
                                        "NAME-seeds3-4-5 (its own experiment, work folder and report)")


def _seed_list(text: str | None) -> list | None:
    """`3,4,5` -> [3, 4, 5]; anything that is not an integer is passed on for the study's own check."""
    if text is None:
        return None
    return [int(part) if part.strip().lstrip("-").isdigit() else part.strip() for part in text.split(",")]


def _with_overrides(study, args: argparse.Namespace, file: str):
    """The study with --storage / --tracking-uri / --seeds, or None after printing the problem (exit 2)."""
    from memlayers.platform.study.schema import StudyError
    from memlayers.platform.study.validate import with_overrides

    try:
        study = with_overrides(study, storage=getattr(args, "storage", None),
                               tracking_uri=getattr(args, "tracking_uri", None),
                               seeds=_seed_list(getattr(args, "seeds", None)))
    except StudyError as error:
        for line in error.lines():
            print(f"{file}: {line}", file=sys.stderr)
        return None
    return study if _no_credentials(study, file) else None


def _no_credentials(study, file: str) -> bool:
    """False, after one line per field, when a URI of the study carries credentials (they would be written
    to MLflow, checkpoints and printed lines)."""
    from memlayers.platform.cluster.secrets import credential_problems

    problems = credential_problems({"storage": study.storage, "tracking.uri": study.tracking.uri,
                                    "data.path": study.data.path})
    for field, reason in problems:
        print(f"{file}: {field}: {reason}", file=sys.stderr)
    return not problems


def _load(file: str):
    """The validated study, or None after printing every problem on stderr."""
    from memlayers.platform.study.schema import StudyError
    from memlayers.platform.study.validate import load_study

    try:
        return load_study(file)
    except StudyError as error:
        for line in error.lines():
            print(line if line.startswith(file) else f"{file}: {line}", file=sys.stderr)
        return None


def _expand(study, file: str):
    from memlayers.platform.study.cells import expand
    from memlayers.platform.study.schema import StudyError

    try:
        return expand(study)
    except StudyError as error:
        for line in error.lines():
            print(f"{file}: {line}", file=sys.stderr)
        return None


def cells_table(cells: list, memory: list[str] | None = None) -> list[str]:
    """id, run name, params, FLOPs/token, tokens, steps, total training FLOPs (and `memory` per GPU), one line
    per cell."""
    memory = memory or [""] * len(cells)
    header = ("id", "run name", "params", "active", "FLOPs/token", "tokens", "steps", "train FLOPs", "GPU memory")
    rows = [header] + [(c.id, c.name, f"{c.params:.3g}", f"{c.active_params:.3g}", f"{c.flops_per_token:.3g}",
                        f"{c.tokens:.3g}", str(c.steps), f"{c.train_flops:.3g}", m) for c, m in zip(cells, memory)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def run_validate(args: argparse.Namespace) -> int:
    study = _load(args.file)
    study = _with_overrides(study, args, args.file) if study is not None else None
    cells = _expand(study, args.file) if study is not None else None
    if cells is None:
        return 2
    if args.json:
        from memlayers.platform.study.bookkeeping import cell_row
        print(json.dumps([cell_row(c) for c in cells], indent=1))
        return 0
    memory = _memory_per_gpu(study, cells, args.file)
    if memory is None:
        return 2
    families = ", ".join(dict.fromkeys(c.family for c in cells))
    print(f"study {study.name}: valid; {len(cells)} cells ({families}); budget {study.budget.kind} "
          f"{', '.join(f'{v:g}' for v in study.budget.values())}; seeds {study.seeds}; "
          f"lr {'tuned (Optuna)' if study.lr.tune else study.lr.value}")
    print(f"workdir {study.workdir_path()}; MLflow {study.tracking_uri()}")
    for line in cells_table(cells, memory):
        print(line)
    return 0


def _memory_per_gpu(study, cells: list, file: str) -> list[str] | None:
    """Each cell's per-GPU memory plan ("ddp 12.3+9.1 GB": held + activations estimate), or None after
    printing the cells whose GPU plan
    does not fit `resources.gpu_memory_gb`, naming `resources`."""
    from memlayers.platform.data.vocab import vocab_size_of
    from memlayers.platform.train.memory_plan import GB, cell_memory_plan

    vocab = vocab_size_of(study.data)
    plans = [cell_memory_plan(c.model, c.data, c.train, c.resources, vocab) for c in cells]
    refused = [(c, p) for c, p in zip(cells, plans) if not p.fits and c.resources.gpus_per_worker > 0]
    for cell, plan in refused:
        print(f"{file}: resources: cell {cell.name} needs {plan.summary()}", file=sys.stderr)
    return None if refused else [f"{p.strategy} {p.state / GB:.1f}+{p.activations / GB:.1f} GB" for p in plans]


def run_run(args: argparse.Namespace) -> int:
    from memlayers.platform.study.schema import StudyError

    study = _load(args.file)
    study = _with_overrides(study, args, args.file) if study is not None else None
    if study is None:
        return 2
    import contextlib

    from memlayers.dashboards.report import write_report
    from memlayers.platform.cluster.session import ray_cluster, session_dir_problem
    from memlayers.platform.study.controller import run_study

    if problem := session_dir_problem(args.address):
        print(f"memlayers study run: {problem}", file=sys.stderr)
        return 2
    try:
        # joining a cluster first lets the controller check, before anything starts, that every node
        # reaches the study's tracking store and storage
        with ray_cluster(args.address) if args.address else contextlib.nullcontext():
            result = run_study(study, args.address, num_cpus=args.num_cpus,
                               workdir=Path(args.workdir) if args.workdir else None,
                               fit=not args.no_fit, report=None if args.no_report else write_report,
                               out=lambda line: print(line, flush=True))
    except StudyError as error:
        for line in error.lines():
            print(f"{args.file}: {line}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def run_submit(args: argparse.Namespace) -> int:
    study = _load(args.file)
    if study is None or _with_overrides(study, args, args.file) is None:
        return 2
    import os

    from memlayers.platform.cluster.secrets import ShipRefused, shipped_env, uri_credentials_problem
    from memlayers.platform.study.submit import FollowStopped, follow_job, job_exit_code, last_error_line, submit_study

    try:
        problem = uri_credentials_problem(args.address)
        if problem:
            raise ShipRefused(f"--address: {problem}")
        shipped = shipped_env(os.environ, args.env, args.ship_secret)
    except ShipRefused as error:
        print(f"memlayers study submit: {error}", file=sys.stderr)
        return 2
    try:
        job_id, client = submit_study(Path(args.file), args.address, workdir=args.workdir, storage=args.storage,
                                      tracking_uri=args.tracking_uri, shipped=shipped)
    except TimeoutError as error:
        print(f"memlayers study submit: {error}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    if not args.wait:
        tracking, where = args.tracking_uri or study.tracking.uri, args.storage or study.storage
        print(f"follow it with: ray job logs --follow --address {args.address} {job_id}\n"
              f"  or: memlayers study status {study.name}" + (f" --tracking-uri {tracking}" if tracking else "")
              + (f" --storage {where}" if where else ""))
        return 0
    try:
        status = follow_job(client, job_id, timeout_s=args.wait_timeout or None)
    except FollowStopped as error:
        print(f"memlayers study submit: {error}; follow it with: ray job logs --follow --address {args.address} "
              f"{job_id}", file=sys.stderr)
        return 1
    if status == "SUCCEEDED":
        print(f"job {job_id}: {status}")
        return 0
    print(f"job {job_id}: {status}: {last_error_line(client.get_job_logs(job_id))}", file=sys.stderr)
    code = job_exit_code(client, job_id)
    return code if isinstance(code, int) and code > 0 else 1


def run_status(args: argparse.Namespace) -> int:
    from memlayers.platform.data.tracked import data_status
    from memlayers.platform.study.cells import expand
    from memlayers.platform.study.progress import cell_runs, cell_states, latest, summary_line
    from memlayers.platform.tracking.conventions import CELLS_FILE, read_progress
    from memlayers.platform.tracking.study_ref import resolve_study

    is_file = args.study.endswith((".yaml", ".yml"))
    if is_file:
        study = _load(args.study)
        if study is None:
            return 2
        name, uri = study.name, args.tracking_uri or study.tracking_uri()
        expected = [(c.id, c.name) for c in expand(study, account_budgets=False)]
    else:
        from memlayers.platform.study.record import RecordError, StudyRecord

        ref = resolve_study(args.study, args.tracking_uri, storage=args.storage)
        name, uri = ref.name, ref.tracking_uri
        try:
            expected = [(c["id"], c["name"]) for c in StudyRecord.of_ref(ref).read_json(CELLS_FILE) or []]
        except RecordError as error:
            print(f"memlayers study status: {error}", file=sys.stderr)
            return 2
    runs = cell_runs(uri, name)
    names = dict(expected)
    for cell_id, cell_list in runs.items():
        names.setdefault(cell_id, latest(cell_list).name)
    if not names:
        print(f"study {name}: no runs in {uri}")
        return 0
    states = cell_states(names, runs)
    print(f"study {name} ({uri})")
    print(f"  {data_status(uri, name)}")
    for cell_id, run_name in names.items():
        run = latest(runs.get(cell_id, []))
        detail = ""
        if run is not None:
            metrics = run.metrics
            if run.state == "running":
                live = read_progress(run.tags)
                detail = f"step {live[0]} loss {live[1]:.4g} {live[2]:,.0f} tok/s" if live else "starting"
            else:
                detail = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("val_loss", "qa_exact_match") if k in metrics)
            if run.state == "failed":
                detail = f"{detail}  reason: {run.tags.get('failure_reason', '?')}".strip()
        print(f"  {states[cell_id]:<8} {run_name:<40} {cell_id}  {detail}".rstrip())
    print(summary_line(states))
    return 0


def run_reference(args: argparse.Namespace) -> int:
    from memlayers.platform.study.reference import render, write

    if args.write:
        write(Path(args.write))
        print(f"wrote {args.write}")
    else:
        print(render(), end="")
    return 0
