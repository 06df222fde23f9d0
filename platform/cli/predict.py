"""`memlayers predict`: the loss a configuration will reach under a fitted joint law, with its interval.

    memlayers predict --law FILE --n N --m M (--d D | --c C) [--form NAME] [--json]

FILE is a joint.json (`memlayers fit --law joint --out DIR`); N active parameters, M memory
parameters (0 for a dense model), D training tokens or C FLOPs (D = C / (6N)). Prints the loss,
its 95% interval over the bootstrap replicates (when the law has them) and the dense-equivalent
compute multiplier: the compute a compute-optimal dense model needs for that loss over C.
With --json one object: loss, interval, compute, dense_equivalent_compute, multiplier (null when
no dense model reaches the loss), multiplier_interval. A law file of another kind or version,
or a bad number, exits with code 2 and one line on standard error.
"""

from __future__ import annotations

import argparse
import sys

LEVEL = 0.95


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--law", required=True, metavar="FILE", help="joint.json written by memlayers fit --law joint")
    parser.add_argument("--n", required=True, type=float, help="active parameters N")
    parser.add_argument("--m", required=True, type=float, help="memory parameters M (0: dense)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--d", type=float, help="training tokens D")
    budget.add_argument("--c", type=float, help="training compute C in FLOPs (D = C / (6N))")
    parser.add_argument("--form", help="a form of the law other than the chosen one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def positive(name: str, value: float | None, allow_zero: bool = False) -> float:
    import math

    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return float(value)


def law_entry(law: dict, form: str | None) -> tuple[str, dict]:
    name = form or law["chosen"]
    if name not in law["forms"]:
        raise ValueError(f"--form: expected one of {', '.join(law['forms'])}, got {name!r}")
    return name, law["forms"][name]


def prediction(law: dict, n: float, m: float, d: float, form: str | None = None) -> dict:
    import numpy as np

    from memlayers.platform.laws.bootstrap import percentile_interval
    from memlayers.platform.laws.joint import predict, replicate_params
    from memlayers.platform.laws.joint_forms import DENSE
    from memlayers.platform.laws.plan import dense_compute

    name, entry = law_entry(law, form)
    loss = float(predict(entry, law, n, m, d))
    compute = 6.0 * n * d
    dense = {k: entry["params"][k] for k in DENSE}
    c_dense = float(dense_compute(dense, loss))
    out = {"form": name, "n": n, "m": m, "d": d, "compute": compute, "loss": loss, "interval": None,
           "dense_equivalent_compute": c_dense if np.isfinite(c_dense) else None,
           "multiplier": c_dense / compute if np.isfinite(c_dense) else None, "multiplier_interval": None}
    reps = replicate_params(entry)
    if reps:
        params = {k: reps.get(k, v) for k, v in entry["params"].items()}
        losses = predict({**entry, "params": params}, law, n, m, d)
        out["interval"] = percentile_interval(losses, LEVEL)
        c_reps = np.array([dense_compute({k: reps[k][i] for k in DENSE}, losses[i]) for i in range(len(losses))])
        out["multiplier_interval"] = percentile_interval(c_reps / compute, LEVEL)
    return out


def run(args: argparse.Namespace) -> int:
    from memlayers.platform.laws.io import dumps
    from memlayers.platform.laws.joint import load_joint

    try:
        law = load_joint(args.law)
        n = positive("--n", args.n)
        m = positive("--m", args.m, allow_zero=True)
        d = positive("--d", args.d) if args.d is not None else positive("--c", args.c) / (6.0 * n)
        out = prediction(law, n, m, d, args.form)
    except ValueError as error:
        print(f"memlayers predict: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(out, indent=None))
        return 0
    interval = f"  95% [{out['interval'][0]:.5g}, {out['interval'][1]:.5g}]" if out["interval"] else ""
    print(f"form {out['form']}: N={n:.4g} M={m:.4g} D={d:.4g} (C={out['compute']:.4g} FLOPs)")
    print(f"  loss {out['loss']:.5g}{interval}")
    if out["multiplier"] is None:
        print("  dense-equivalent compute: unbounded (no dense model of this law reaches the loss)")
    else:
        mi = out["multiplier_interval"]
        extra = f"  95% [{mi[0]:.3g}, {mi[1]:.3g}]" if mi else ""
        print(f"  dense-equivalent compute {out['dense_equivalent_compute']:.4g} FLOPs: "
              f"{out['multiplier']:.3g}x the compute spent{extra}")
    return 0
