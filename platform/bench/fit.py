"""`memlayers bench fit`: the Chinchilla grid fit, analytic-gradient batched vs plain scipy; the joint law.

Side by side in one process on Epoch AI's Chinchilla points (240 after dropping the 5 highest
losses):
- plain: the published procedure as usually written — scipy L-BFGS-B from each start with
  numerical (finite-difference) gradients of a scipy.special.huber / logsumexp objective. It is
  timed on a seeded random subset of the 4,500 starts and scaled to 4,500 (the report says so);
- per-start analytic: the same loop with the analytic gradient (same subset, scaled);
- batched: `chinchilla.fit_chinchilla`, every one of the 4,500 starts, timed in full;
- the joint law L(N, M, D) (`joint.fit_joint`: every form, held-out errors, `--joint-bootstrap`
  replicates, 200 by default) on the seeded synthetic grid of `joint_synthetic` (50 points of the
  effective-parameters form: the Chinchilla points have no memory), timed in full.
Wall-clock and CPU times are both printed: on a shared machine CPU time is the steadier measure.
Every variant runs with BLAS limited to one thread (when threadpoolctl is installed): with more,
scipy's L-BFGS-B spends most of its time waking BLAS threads, which would flatter the speedup.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

N_GRID = 4500


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", help="Chinchilla points (default: $MEMLAYERS_CHINCHILLA_CSV, "
                                      "else ../shared/data/chinchilla/ beside the repository)")
    parser.add_argument("--plain-starts", type=int, default=60,
                        help="starts the plain procedure is timed on (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset of starts (default 0)")
    parser.add_argument("--bootstrap", type=int, default=0, help="also time a bootstrap with this many replicates")
    parser.add_argument("--joint-bootstrap", type=int, default=200, metavar="B",
                        help="bootstrap replicates of the timed joint-law fit (default 200; 0: skip the joint law)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


class _Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _plain_loop(problem, starts, analytic: bool):
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.laws.logfit import one_blas_thread

    return one_blas_thread(_loop)(problem, starts, analytic)


def _loop(problem, starts, analytic: bool):
    # deferred: a bench target imports what it measures only when it runs
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import huber, logsumexp

    log_n, log_d, log_loss = problem.u_PK[:, 0], problem.u_PK[:, 1], problem.v_P

    def objective(theta):
        a, b, e, alpha, beta = theta
        pred = logsumexp([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)], axis=0)
        return float(np.sum(huber(problem.delta, pred - log_loss)))

    def with_gradient(theta):
        f_S, g_SQ = problem.fun_grad(theta[None, :])
        return float(f_S[0]), g_SQ[0]

    best = None
    for x0 in starts:
        if analytic:
            res = minimize(with_gradient, x0, jac=True, method="L-BFGS-B")
        else:
            res = minimize(objective, x0, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    return best


def run(args: argparse.Namespace) -> int:
    # deferred: a bench target imports what it measures only when it runs
    import numpy as np

    from memlayers.platform.laws.chinchilla import (
        fit_chinchilla,
        grid_starts,
        params_from_theta,
        problem,
        tokens_from_compute,
    )
    from memlayers.platform.laws.io import (
        chinchilla_csv_path,
        read_columns,
    )

    path = args.csv or chinchilla_csv_path()
    try:
        table = read_columns(path, ["Model Size", "Training FLOP", "loss"])
    except ValueError as error:
        print(f"memlayers bench fit: {error} (set MEMLAYERS_CHINCHILLA_CSV or pass --csv)", file=sys.stderr)
        return 2
    if not 1 <= args.plain_starts <= N_GRID:
        print(f"memlayers bench fit: --plain-starts must be in [1, {N_GRID}]", file=sys.stderr)
        return 2
    if args.joint_bootstrap < 0:
        print(f"memlayers bench fit: --joint-bootstrap must be >= 0, got {args.joint_bootstrap}", file=sys.stderr)
        return 2
    keep = np.sort(np.argsort(table["loss"], kind="stable")[:-5])
    n, loss = table["Model Size"][keep], table["loss"][keep]
    d = tokens_from_compute(n, table["Training FLOP"][keep])
    prob = problem(n, d, loss)
    grid = grid_starts()
    subset = grid[np.sort(np.random.default_rng(args.seed).choice(N_GRID, args.plain_starts, replace=False))]
    scale = N_GRID / len(subset)

    with _Timer() as t_plain:
        plain = _plain_loop(prob, subset, analytic=False)
    with _Timer() as t_analytic:
        analytic = _plain_loop(prob, subset, analytic=True)
    with _Timer() as t_batched:
        fit = fit_chinchilla(n, d, loss)
    report = {
        "points": int(len(loss)),
        "plain_starts_timed": len(subset),
        "scaled_to_starts": N_GRID,
        "plain_numeric_s": {"wall": t_plain.wall * scale, "cpu": t_plain.cpu * scale},
        "per_start_analytic_s": {"wall": t_analytic.wall * scale, "cpu": t_analytic.cpu * scale},
        "batched_analytic_s": {"wall": t_batched.wall, "cpu": t_batched.cpu},
        "speedup_vs_plain": {"wall": t_plain.wall * scale / t_batched.wall, "cpu": t_plain.cpu * scale / t_batched.cpu},
        "plain_subset_best": {"objective": float(plain.fun), **params_from_theta(plain.x)},
        "analytic_subset_best": {"objective": float(analytic.fun), **params_from_theta(analytic.x)},
        "batched_full_grid": {"objective": fit.objective, **fit.params},
    }
    if args.bootstrap > 0:
        with _Timer() as t_boot:
            boot = fit_chinchilla(n, d, loss, bootstrap=args.bootstrap, seed=0)
        report["bootstrap"] = {"replicates": args.bootstrap, "wall_s": t_boot.wall - t_batched.wall,
                               "cpu_s": t_boot.cpu - t_batched.cpu, "intervals": boot.intervals}
    if args.joint_bootstrap > 0:
        report["joint"] = _time_joint(args.joint_bootstrap)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"Chinchilla approach 3 on {report['points']} points, grid of {N_GRID} starts, BLAS on one thread")
    print(f"plain scipy, numeric gradients  : {report['plain_numeric_s']['wall']:8.1f} s wall "
          f"{report['plain_numeric_s']['cpu']:8.1f} s cpu  (timed on {len(subset)} random starts, scaled x{scale:.0f})")
    print(f"per-start L-BFGS-B, analytic    : {report['per_start_analytic_s']['wall']:8.1f} s wall "
          f"{report['per_start_analytic_s']['cpu']:8.1f} s cpu  (same subset, scaled)")
    print(f"batched, analytic, all starts   : {t_batched.wall:8.1f} s wall {t_batched.cpu:8.1f} s cpu  (measured)")
    print(f"speedup vs plain                : {report['speedup_vs_plain']['wall']:8.1f}x wall "
          f"{report['speedup_vs_plain']['cpu']:8.1f}x cpu")
    p = fit.params
    print(f"batched fit: A={p['A']:.1f} B={p['B']:.0f} E={p['E']:.4f} alpha={p['alpha']:.5f} "
          f"beta={p['beta']:.5f} objective={fit.objective:.6g}")
    q = report["plain_subset_best"]
    print(f"plain best on its subset: A={q['A']:.1f} B={q['B']:.0f} E={q['E']:.4f} alpha={q['alpha']:.5f} "
          f"beta={q['beta']:.5f} objective={q['objective']:.6g}")
    if "joint" in report:
        j = report["joint"]
        print(f"joint law, {len(j['forms'])} forms on {j['points']} synthetic points, held-out errors, "
              f"{j['replicates']} bootstrap replicates: {j['wall_s']:.1f} s wall {j['cpu_s']:.1f} s cpu; "
              f"chosen {j['chosen']} (generated by {j['generated_by']})")
    if "bootstrap" in report:
        b = report["bootstrap"]
        print(f"bootstrap x{b['replicates']}: {b['wall_s']:.1f} s wall {b['cpu_s']:.1f} s cpu; "
              + ", ".join(f"{k} [{v[0]:.4g}, {v[1]:.4g}]" for k, v in b["intervals"].items()))
    return 0


def _time_joint(replicates: int) -> dict:
    """fit_joint on the synthetic grid of the effective-parameters form, timed in full."""
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.laws.joint import fit_joint
    from memlayers.platform.laws.joint_synthetic import synthetic_points

    generated_by = "effective_params"
    pts = synthetic_points(generated_by, seed=0)
    with _Timer() as timer:
        record = fit_joint(pts["N"], pts["M"], pts["D"], pts["loss"], bootstrap=replicates, seed=0)
    return {"points": int(pts["loss"].size), "forms": list(record["forms"]), "replicates": replicates,
            "wall_s": timer.wall, "cpu_s": timer.cpu, "chosen": record["chosen"], "generated_by": generated_by}
