"""`memlayers report STUDY [--out DIR] [--figure PNG]`: write a study's HTML report.

STUDY is a study file, a study name (`./runs/NAME/`) or a study work directory. The report goes to
`<workdir>/report/report.html` unless `--out` says otherwise, and is logged to the study's parent
MLflow run. `--figure` also writes the headline figure (loss vs training compute, or the
memory-size figure when every cell had the same budget); the README's
figure is regenerated with `memlayers report runs/quickstart --figure docs/headline.png`
(`make figure`). Exit codes: 0 written, 2 unknown study or no headline figure to write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study file, study name, or study work directory")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default <workdir>/report)")
    parser.add_argument("--figure", type=Path, default=None, metavar="PNG",
                        help="also write the headline figure to this PNG (loss vs compute; the memory-size "
                             "figure when every cell had the same budget)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the study's store)")
    parser.add_argument("--storage", default=None, help="the study's storage root (s3://bucket/prefix): its laws.json "
                                                        "is read from and the report copied to <storage>/<study>/")
    parser.add_argument("--bootstrap", type=int, default=None,
                        help="bootstrap replicates when the laws must be refitted for the report "
                             "(default: the study's fit.bootstrap)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the study's MLflow run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from memlayers.dashboards.report import NoHeadlineFigure, write_report
    from memlayers.dashboards.study_arg import StudyNotFound, existing_store, experiment_id, resolve_study_arg
    from memlayers.platform.cluster import storage
    from memlayers.platform.study.record import REPORT_FILE, RecordError, StudyRecord

    try:
        ref = resolve_study_arg(args.study, args.tracking_uri)
        existing_store(ref)
        if experiment_id(ref) is None:
            raise StudyNotFound(f"study {ref.name}: no MLflow experiment of that name at {ref.tracking_uri}")
    except StudyNotFound as error:
        print(f"memlayers report: {error}", file=sys.stderr)
        return 2
    if args.storage:  # the study's record (laws.json, cells.json) is read from where the cluster wrote it
        ref = dataclasses.replace(ref, storage=storage.study_root(args.storage, ref.name))
    try:
        path = write_report(ref, args.out, log_artifacts=not args.no_log, figure_path=args.figure,
                            bootstrap=args.bootstrap)
    except (NoHeadlineFigure, RecordError) as error:
        print(f"memlayers report: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    record = StudyRecord.of_ref(ref)
    if record.remote:
        print(f"report: {storage.upload(path, record.location(REPORT_FILE))}")
    if args.figure is not None:
        print(f"headline figure: {args.figure}")
    return 0
