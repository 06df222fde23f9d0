"""`memlayers fit --law joint`: the joint law L(N, M, D) of a CSV or a study, written as joint.json.

    memlayers fit --law joint --csv FILE --n COL [--m COL] (--d COL | --c COL) --loss COL [--drop-highest K]
                  [--bootstrap B] [--seed S] [--out DIR] [--json | --format md|latex|csv]
    memlayers fit --law joint --study NAME|FILE [--family memory_plus] [--out DIR] ...

--out DIR writes DIR/joint.json (a study's default: <workdir>/laws/joint.json), the file
`memlayers predict` and `memlayers plan` read. Without --json or --format it prints every
form's parameters with their intervals, held-out errors and the chosen form.
"""

from __future__ import annotations

import argparse
from pathlib import Path

JOINT_FILE = "joint.json"


def _csv_points(args: argparse.Namespace) -> tuple[dict, dict]:
    import numpy as np

    from memlayers.platform.laws import checks
    from memlayers.platform.laws.io import file_provenance, read_columns

    if not args.n or not (args.d or args.c):
        raise ValueError("--law joint needs --n and --d (tokens) or --c (compute, D = C / (6N)); "
                         "--m (memory parameters; without it every row is dense)")
    used = {"N": args.n, **({"M": args.m} if args.m else {}), **({"D": args.d} if args.d else {"C": args.c})}
    table = read_columns(args.csv, [*dict.fromkeys([*used.values(), args.loss])])
    loss = checks.as_column(args.loss, table[args.loss], positive=False)
    keep = np.arange(loss.size)
    if args.drop_highest:
        if not 0 <= args.drop_highest < loss.size:
            raise ValueError(f"--drop-highest: must be in [0, {loss.size - 1}] for {loss.size} rows")
        keep = np.sort(np.argsort(loss, kind="stable")[: loss.size - args.drop_highest])
    points = {name: table[col][keep] for name, col in used.items()}
    points.setdefault("M", np.zeros(keep.size))
    if "C" in points:
        points["D"] = checks.as_column("C", points.pop("C")) / (6.0 * checks.as_column("N", points["N"]))
    points["loss"] = loss[keep]
    provenance = {**file_provenance(args.csv), "columns": {**used, "target": args.loss},
                  "rows_read": int(loss.size), "dropped_highest": args.drop_highest}
    return points, provenance


def run_joint(args: argparse.Namespace) -> int:
    from memlayers.platform.laws.io import dumps
    from memlayers.platform.laws.joint import fit_joint

    bootstrap = args.bootstrap or 0
    if args.study:
        from memlayers.platform.laws.joint_study import fit_joint_rows
        from memlayers.platform.study.record import StudyRecord
        from memlayers.platform.tracking.study_ref import resolve_study

        study = StudyRecord.of_ref(resolve_study(args.study, args.tracking_uri, storage=args.storage))
        rows = study.rows()  # the finished runs of the study's current cells, as its other laws use
        record = fit_joint_rows(rows, memory_family=args.family, bootstrap=bootstrap, seed=args.seed)
        record["provenance"] = {"study": study.name, "tracking_uri": study.tracking_uri, "runs": len(rows)}
        out_dir = Path(args.out) if args.out else study.local("laws")
    else:
        points, provenance = _csv_points(args)
        record = fit_joint(points["N"], points["M"], points["D"], points["loss"], bootstrap=bootstrap,
                           seed=args.seed)
        record["provenance"] = provenance
        out_dir = Path(args.out) if args.out else None
    written = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = out_dir / JOINT_FILE
        written.write_text(dumps(record) + "\n")
    if args.json:
        print(dumps(record, indent=None))
    elif args.format:
        from memlayers.platform.cli.tables import render

        print(render(joint_rows(record), args.format))
    else:
        print(summary(record))
    if written and not args.json and not args.format:
        print(f"wrote {written}")
    return 0


def joint_rows(record: dict) -> list[tuple]:
    """Table rows of every form: its parameters, then its held-out errors (no interval)."""
    from memlayers.platform.cli.tables import law_rows

    rows = []
    for name, entry in record["forms"].items():
        label = f"joint/{name}" + (" (chosen)" if name == record["chosen"] else "")
        rows += law_rows(label, entry["params"], entry.get("intervals"))
        held = entry.get("held_out", {})
        for criterion in ("leave_one_base_out", "leave_largest_compute_out"):
            if "log_rmse" in held.get(criterion, {}):
                rows.append((label, f"held-out log RMSE, {criterion.replace('_', '-')}",
                             held[criterion]["log_rmse"], None, None))
    return rows


def summary(record: dict) -> str:
    lines = [f"joint law: {record['n_points']} points ({record['n_memory_points']} with a memory), "
             f"m_ref {record['m_ref']:.4g}, n_ref {record['n_ref']:.4g}"]
    for name, entry in record["forms"].items():
        mark = "  <- chosen" if name == record["chosen"] else ""
        lines.append(f"  form {name}: {entry['description']}{mark}")
        for key, value in entry["params"].items():
            interval = (entry.get("intervals") or {}).get(key)
            shown = "not identified" if value is None else f"{value:.6g}"
            extra = f"   95% [{interval[0]:.6g}, {interval[1]:.6g}]" if interval else ""
            lines.append(f"    {key:<8} {shown}{extra}")
        if entry.get("warning"):
            lines.append(f"    warning: {entry['warning']}")
        held = entry["held_out"]
        lines.append("    held-out log RMSE: " + ", ".join(
            f"{k.replace('_', '-')} " + (f"{v['log_rmse']:.4g}" if "log_rmse" in v else f"skipped ({v['skipped']})")
            for k, v in held.items() if k != "score"))
    lines.append(f"  chosen: {record['chosen']} ({record['selection']['why']})")
    moe = record.get("moe", {})
    lines.append("  MoE: " + (f"skipped ({moe['skipped']})" if "skipped" in moe else
                              ", ".join(f"{k}={v:.4g}" for k, v in moe["params"].items())))
    return "\n".join(lines)
