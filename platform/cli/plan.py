"""`memlayers plan`: what to train for a compute budget under a fitted joint law.

    memlayers plan --law FILE --compute C [--gpu-memory 80GB] [--gpus G] [--max-memory-params P]
                   [--form NAME] [--json]

Prints the compute-optimal (N, M, D) within the constraints (see `laws/plan.py` for the memory
model) with 95% intervals over the law's bootstrap replicates, the dense optimum (M = 0) and,
when the law file has an MoE fit, the MoE optimum beside it, then the frontier: the optimum over
budgets from C/100 to 100·C. --json prints one object: n, m, d, loss of the optimum, intervals,
binding, dense, moe, frontier. A law file of another kind or version exits with code 2.
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--law", required=True, metavar="FILE", help="joint.json written by memlayers fit --law joint")
    parser.add_argument("--compute", required=True, type=float, help="training compute budget C in FLOPs")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default 80GB; 80GiB = 2^30 bytes)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the value tables are sharded over (default 1)")
    parser.add_argument("--max-memory-params", type=float, help="upper bound on the memory parameters M")
    parser.add_argument("--form", help="a form of the law other than the chosen one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def make_plan(law: dict, args: argparse.Namespace) -> dict:
    from memlayers.platform.cli.predict import law_entry, positive
    from memlayers.platform.laws.plan import Constraints, frontier, optimum, parse_bytes

    name, _ = law_entry(law, args.form)
    compute = positive("--compute", args.compute)
    limit = None if args.max_memory_params is None else positive("--max-memory-params", args.max_memory_params,
                                                                  allow_zero=True)
    constraints = Constraints(parse_bytes(args.gpu_memory), args.gpus, limit)
    plan = optimum(law, compute, constraints, form=name)
    best = plan["optimum"]
    return {**{k: best[k] for k in ("n", "m", "d", "loss")}, "intervals": best.get("intervals"),
            "binding": best.get("binding", []), "multiplier": best.get("multiplier"), **plan,
            "frontier": frontier(law, compute, constraints, form=name)}


def _interval(entry: dict, key: str, fmt: str = ".4g") -> str:
    interval = (entry.get("intervals") or {}).get(key)
    return f" [{interval[0]:{fmt}}, {interval[1]:{fmt}}]" if interval else ""


def run(args: argparse.Namespace) -> int:
    from memlayers.platform.laws.io import dumps
    from memlayers.platform.laws.joint import load_joint

    try:
        plan = make_plan(load_joint(args.law), args)
    except ValueError as error:
        print(f"memlayers plan: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(plan, indent=None))
        return 0
    c = plan["constraints"]
    print(f"plan for C = {plan['compute']:.4g} FLOPs, form {plan['form']}, {c['gpus']} GPU(s) of "
          f"{c['gpu_memory_bytes'] / 1e9:.4g} GB" + (f", M <= {c['max_memory_params']:.4g}"
                                                    if c["max_memory_params"] is not None else ""))
    for label, entry in (("memory", plan["optimum"]), ("dense", plan["dense"])):
        print(f"  {label:<7} N={entry['n']:.4g}{_interval(entry, 'n')} M={entry['m']:.4g}{_interval(entry, 'm')} "
              f"D={entry['d']:.4g}{_interval(entry, 'd')} loss={entry['loss']:.4f}{_interval(entry, 'loss', '.4f')}"
              + (f"  binding: {', '.join(entry['binding'])}" if entry.get("binding") else ""))
    moe = plan["moe"]
    print(f"  moe     skipped: {moe['skipped']}" if "skipped" in moe else
          f"  moe     N={moe['n']:.4g} D={moe['d']:.4g} loss={moe['loss']:.4f} ({moe['note']})")
    for note in plan["optimum"].get("extrapolation", []):
        print(f"  extrapolation: {note}")
    if plan["multiplier"] is not None:
        print(f"  the memory optimum is worth {plan['multiplier']:.3g}x C of compute-optimal dense training")
    print("  frontier:")
    print(f"    {'C':>10} {'N':>10} {'M':>10} {'D':>10} {'loss':>8} {'dense':>8} {'binding'}")
    for row in plan["frontier"]:
        if "skipped" in row:
            print(f"    {row['compute']:>10.3g} skipped: {row['skipped']}")
            continue
        print(f"    {row['compute']:>10.3g} {row['n']:>10.3g} {row['m']:>10.3g} {row['d']:>10.3g} "
              f"{row['loss']:>8.4f} {row['dense_loss']:>8.4f} {', '.join(row['binding'])}")
    return 0
