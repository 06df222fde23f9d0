"""`memlayers fit`: fit a scaling law to a CSV, or every law of a study from its MLflow runs.

    memlayers fit --csv FILE --law chinchilla --n "Model Size" --c "Training FLOP" --loss loss
                  [--d COL] [--drop-highest 5] [--bootstrap 1000] [--seed S] [--json] [--out DIR]
    memlayers fit --csv FILE --law compute --c COL --loss COL
    memlayers fit --csv FILE --law memory|recall --m COL --loss COL [--floor F]
    memlayers fit --law joint (--csv FILE --n COL [--m COL] --d COL|--c COL --loss COL | --study NAME|FILE)
                  [--out DIR]   (DIR/joint.json; see cli/joint_fit.py)
    ... [--format md|latex|csv]   the fitted parameters as a table for a paper
    memlayers fit --study NAME|FILE [--tracking-uri URI] [--storage URI] [--out DIR] [--bootstrap B] [--json]

--study fits the laws and checks the claims of the study's definition (the file, else the `study.yaml`
its controller recorded, else the file logged to its parent run) on its current cells, the same fit as
the end of `study run` (study/record.py), into the study's `laws/laws.json` (`--out DIR`: DIR/laws.json).

With --json, standard output is one JSON object. Degenerate input (too few points, NaN,
non-positive losses, a single model size) exits with code 2 and a message on standard error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

LAWS = ("chinchilla", "compute", "memory", "recall", "joint")


def register(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="points to fit, one row per run")
    source.add_argument("--study", metavar="NAME|FILE", help="fit every law of a study from its MLflow runs")
    parser.add_argument("--law", choices=LAWS, default="chinchilla", help="law to fit to --csv (default chinchilla)")
    parser.add_argument("--n", metavar="COL", help="column of model sizes N (parameters)")
    parser.add_argument("--d", metavar="COL", help="column of training tokens D (default C / (6N) from --c)")
    parser.add_argument("--c", metavar="COL", help="column of training compute C (FLOPs)")
    parser.add_argument("--m", metavar="COL", help="column of memory sizes M (slots) for memory/recall laws; "
                                                  "memory parameters for --law joint")
    parser.add_argument("--family", default="memory_plus", help="--law joint --study: the memory family fitted "
                                                                 "with the dense cells (default memory_plus)")
    parser.add_argument("--format", choices=("md", "latex", "csv"),
                        help="print the fitted parameters as a table (Markdown, LaTeX or CSV) instead of text")
    parser.add_argument("--loss", metavar="COL", default="loss", help="column of the fitted quantity (default loss)")
    parser.add_argument("--floor", type=float, help="recall law: fix the floor (e.g. the dense model's recall)")
    parser.add_argument("--drop-highest", type=int, default=0, metavar="K",
                        help="drop the K rows with the highest --loss")
    parser.add_argument("--bootstrap", type=int, default=None, metavar="B",
                        help="bootstrap replicates for 95%% intervals (default 0; --study: the study's fit.bootstrap)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI of --study (default: the study's)")
    parser.add_argument("--storage", metavar="URI", help="the storage root of --study (s3://bucket/prefix): laws.json "
                                                        "is also written to <storage>/<study>/laws/")
    parser.add_argument("--json", action="store_true", help="print one JSON object on standard output")
    parser.add_argument("--out", metavar="DIR", help="write <law>.json and <law>_points.csv (study: laws.json)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.bootstrap is not None and args.bootstrap < 0:
            raise ValueError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
        if args.law == "joint":
            from memlayers.platform.cli.joint_fit import run_joint

            return run_joint(args)
        if args.study:
            if args.format:
                raise ValueError("--format: prints a --csv fit or --law joint; a study's laws are in laws.json")
            return run_study(args)
        args.bootstrap = args.bootstrap or 0
        return run_csv(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"memlayers fit: error: {error}", file=sys.stderr)
        return 2


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"--law {args.law} needs {' and '.join(missing)}")


def _read_points(args: argparse.Namespace) -> tuple[dict, dict, "np.ndarray", dict]:
    """(inputs by law input name, columns used, observed, provenance) after dropping rows."""
    import numpy as np

    from memlayers.platform.laws import checks
    from memlayers.platform.laws.io import file_provenance, read_columns

    if args.law == "chinchilla":
        _require(args, "n")
        if not (args.d or args.c):
            raise ValueError("--law chinchilla needs --d (tokens) or --c (compute, D = C / (6N))")
        used = {"N": args.n, **({"D": args.d} if args.d else {"C": args.c})}
    elif args.law == "compute":
        _require(args, "c")
        used = {"C": args.c}
    else:
        _require(args, "m")
        used = {"M": args.m}
    table = read_columns(args.csv, [*dict.fromkeys([*used.values(), args.loss])])
    observed = checks.as_column(args.loss, table[args.loss], positive=False)
    rows_read = len(observed)
    keep = np.arange(rows_read)
    if args.drop_highest:
        if not 0 <= args.drop_highest < rows_read:
            raise ValueError(f"--drop-highest: must be in [0, {rows_read - 1}] for {rows_read} rows")
        keep = np.sort(np.argsort(observed, kind="stable")[: rows_read - args.drop_highest])
    inputs = {name: table[col][keep] for name, col in used.items()}
    if "C" in inputs and args.law == "chinchilla":
        from memlayers.platform.laws.chinchilla import tokens_from_compute

        inputs["D"] = tokens_from_compute(checks.as_column("N", inputs["N"]), checks.as_column("C", inputs.pop("C")))
    provenance = {**file_provenance(args.csv), "columns": {**used, "target": args.loss},
                  "rows_read": rows_read, "dropped_highest": args.drop_highest}
    return inputs, used, observed[keep], provenance


def _fit(args: argparse.Namespace, inputs: dict, observed):
    if args.law == "chinchilla":
        from memlayers.platform.laws.chinchilla import fit_chinchilla

        return fit_chinchilla(inputs["N"], inputs["D"], observed, bootstrap=args.bootstrap, seed=args.seed)
    if args.law == "recall":
        from memlayers.platform.laws.recall import fit_recall

        return fit_recall(inputs["M"], observed, floor=args.floor, bootstrap=args.bootstrap, seed=args.seed)
    from memlayers.platform.laws.power import fit_power_law

    x = inputs["C"] if args.law == "compute" else inputs["M"]
    return fit_power_law(x, observed, law=args.law, bootstrap=args.bootstrap, seed=args.seed)


def run_csv(args: argparse.Namespace) -> int:
    from memlayers.platform.laws.io import dumps, save_fit

    inputs, _, observed, provenance = _read_points(args)
    fit = _fit(args, inputs, observed)
    fit.provenance = provenance
    written = save_fit(fit, args.out, inputs, observed) if args.out else []
    if args.json:
        print(dumps(fit.to_dict(), indent=None))
    elif args.format:
        from memlayers.platform.cli.tables import law_rows, render

        print(render(law_rows(fit.law, fit.params, fit.intervals), args.format))
    else:
        print(summary(fit))
        for path in written:
            print(f"wrote {path}")
    return 0


def summary(fit) -> str:
    """A few readable lines: the law, its parameters with intervals, the objective."""
    lines = [f"law {fit.law}: {fit.n_points} points, objective {fit.objective:.6g}"]
    for name, value in fit.params.items():
        interval = (fit.intervals or {}).get(name)
        extra = f"   95% [{interval[0]:.6g}, {interval[1]:.6g}]" if interval else ""
        lines.append(f"  {name:<10} {value:.6g}{extra}")
    frontier = fit.details.get("frontier")
    if frontier:
        lines.append(f"  frontier   N_opt = {frontier['G']:.4g}·(C/6)^{frontier['n_exponent']:.4f}, "
                     f"D_opt = (C/6)^{frontier['d_exponent']:.4f}/{frontier['G']:.4g}")
    return "\n".join(lines)


def run_study(args: argparse.Namespace) -> int:
    from memlayers.platform.laws.io import dumps
    from memlayers.platform.study.record import LAWS_FILE, StudyRecord, fit_and_record, print_claims
    from memlayers.platform.tracking.study_ref import resolve_study

    record = StudyRecord.of_ref(resolve_study(args.study, args.tracking_uri, storage=args.storage))
    written = Path(args.out) / Path(LAWS_FILE).name if args.out else record.local(LAWS_FILE)
    fitted = fit_and_record(record, bootstrap=args.bootstrap, seed=args.seed, to=written if args.out else None)
    result, parent = fitted.laws, fitted.laws["provenance"]["parent_run_id"]
    if not parent:
        print(f"memlayers fit: no parent run tagged memlayers.role=study in {record.name!r}; "
              "laws.json not logged to MLflow", file=sys.stderr)
    elif fitted.warning:
        print(f"memlayers fit: warning: {fitted.warning}", file=sys.stderr)
    if args.json:
        print(dumps(result, indent=None))
        return 0
    logged = f", logged to run {parent}" if parent and not fitted.warning else ""
    print(f"study {record.name}: {len(fitted.rows)} finished runs; wrote {written}{logged}")
    if str(fitted.where) != str(written):
        print(f"  and {fitted.where}")
    for note in result["notes"]:
        print(f"  note: {note}")
    for name, entry in result.get("compute_laws", {}).items():
        print(f"  compute law {name}: " + (f"skipped ({entry['skipped']})" if "skipped" in entry else
                                           ", ".join(f"{k}={v:.4g}" for k, v in entry["params"].items())
                                           + _warning(entry)))
    for key, metrics in result.get("memory_laws", {}).items():
        for metric, entry in metrics.items():
            suffix = _warning(entry) if isinstance(entry, dict) else ""
            if suffix:
                print(f"  memory law {key} {metric}:{suffix}")
    for reference, table in result.get("multipliers", {}).items():
        if "skipped" in table:
            continue
        for family, entry in table.items():
            if "k" in entry:
                print(f"  {family} {reference}: k = {entry['k']:.3g}")
    for reason in result["skipped"]:
        print(f"  skipped: {reason}")
    print_claims(result, print)
    return 0


def _warning(entry: dict) -> str:
    from memlayers.platform.laws.result import fit_warning

    warning = fit_warning(entry)
    return f" (warning: {warning})" if warning else ""
