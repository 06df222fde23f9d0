"""`memlayers data prepare FILE`: tokenize a study's (or a run's) corpus once into shards in storage.

    memlayers data prepare FILE [--storage URI] [--address auto|ray://HOST:10001|HOST:PORT] [--workdir DIR]
                                [--tracking-uri URI] [--no-ray] [--all]

FILE is a study (its largest cell's tokens are prepared) or a run config (its run's tokens); with
`--all` the whole corpus (a later, larger study then finds everything prepared). The
work runs as Ray Data tasks on the cluster at `--address`, on a local Ray without it, or in this
process with `--no-ray`; the set lands in `<storage>/data/<fingerprint>/` (the workdir's
`data-cache` without storage) and is recorded as an MLflow run of role `data`. `study run`,
`study submit` and `train` do the same step themselves when the data is not prepared yet. A bad
source fails with one line naming its field (`data.path`, `data.text_field`, `storage`), exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="tokenize a study's or run's corpus into shards in storage")
    prepare.add_argument("file", help="a study YAML or a run config YAML")
    prepare.add_argument("--storage", help="s3://bucket/prefix, gs://..., or a path every node shares "
                                           "(overrides the file's storage)")
    prepare.add_argument("--address", help="an existing Ray cluster; default: a local one")
    prepare.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    prepare.add_argument("--workdir", help="the work directory (its data-cache holds the set without storage)")
    prepare.add_argument("--tracking-uri", help="MLflow tracking URI (default: the file's)")
    prepare.add_argument("--no-ray", action="store_true", help="tokenize in this process, one part after another")
    prepare.add_argument("--all", action="store_true", help="the whole corpus, not only what the file's runs read")
    prepare.set_defaults(func=run_prepare)


def _fail(file: str, lines: list[str]) -> int:
    for line in lines:
        print(f"memlayers data prepare: {file}: {line}", file=sys.stderr)
    return 2


def _study_preparer(args: argparse.Namespace):
    """A callable that prepares the study's data, or an exit code after printing the problem."""
    from memlayers.platform.cli.study import _expand, _load, _with_overrides
    from memlayers.platform.study.data_prep import prepare_study_data

    study = _load(args.file)
    study = _with_overrides(study, args, args.file) if study is not None else None
    cells = _expand(study, args.file) if study is not None else None
    if cells is None:
        return 2
    if args.workdir:
        import dataclasses
        study = dataclasses.replace(study, workdir=str(Path(args.workdir).resolve()))
    study.workdir_path().mkdir(parents=True, exist_ok=True)
    return lambda: prepare_study_data(study, cells, study.tracking_uri(), print, whole=args.all)


def _run_preparer(args: argparse.Namespace):
    from memlayers.config_schema import ConfigError
    from memlayers.platform.data.build import check_source
    from memlayers.platform.data.tracked import prepare_tracked
    from memlayers.platform.tracking import client as tracking
    from memlayers.platform.tracking.conventions import artifact_location, sqlite_uri
    from memlayers.platform.train.launcher import data_need, data_root, resolve_workdir, storage_root
    from memlayers.platform.train.run_config import load_run_config

    overrides = [f"storage={args.storage}"] if args.storage else []
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    try:
        cfg = load_run_config(args.file, overrides)
    except ConfigError as error:
        return _fail(args.file, [str(error)])
    workdir = resolve_workdir(cfg, Path(args.workdir) if args.workdir else None)
    try:  # before Ray starts: a bad source or storage is refused with nothing started
        check_source(cfg.data, data_root(cfg, workdir))
    except ConfigError as error:
        return _fail(args.file, [str(error)])
    need = (lambda vocab: None) if args.all else (lambda vocab: data_need(cfg, vocab))

    def prepare():
        workdir.mkdir(parents=True, exist_ok=True)
        uri = cfg.tracking.uri or sqlite_uri(workdir)
        experiment = tracking.ensure_experiment(uri, cfg.tracking.experiment or cfg.name,
                                                artifact_location(uri, storage_root(cfg, workdir)))
        return [prepare_tracked(cfg.data, data_root(cfg, workdir), need, uri=uri,
                                experiment_id=experiment, out=print, always=True)]
    return prepare


def run_prepare(args: argparse.Namespace) -> int:
    import contextlib

    from memlayers.config_schema import ConfigError, read_yaml
    from memlayers.platform.data.build import describe
    from memlayers.platform.study.schema import StudyError

    try:
        is_study = isinstance(data := read_yaml(args.file), dict) and "grid" in data
    except (OSError, ConfigError) as error:
        return _fail(args.file, [str(error)])
    preparer = _study_preparer(args) if is_study else _run_preparer(args)
    if isinstance(preparer, int):
        return preparer
    if args.no_ray:
        cluster = contextlib.nullcontext()
    else:
        from memlayers.platform.cluster.session import ray_cluster
        cluster = ray_cluster(args.address, num_cpus=args.num_cpus)
    try:
        with cluster:
            manifests = preparer()
    except StudyError as error:
        return _fail(args.file, error.lines())
    except ConfigError as error:
        return _fail(args.file, [str(error)])
    for manifest in manifests:
        print("data: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
                                   for k, v in describe(manifest).items()))
    return 0
