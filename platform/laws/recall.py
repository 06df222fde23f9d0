"""Recall against memory size: a monotone logistic in log M.

    R(M) = floor + (ceiling − floor) · σ(slope · (ln M − log_m_mid)),   σ(t) = 1 / (1 + e^(−t))

Why this form: factual recall (exact match of the probe's answers) lives in [0, 1] and saturates
at both ends. A small memory leaves the base model's own recall (the floor); a large one
approaches a ceiling set by the probe and by how often training showed each fact. A power law in
M cannot saturate above, so it misfits both tails. The logistic is constrained monotone
non-decreasing (slope ≥ 0, floor ≤ ceiling, both in [0, 1]); log_m_mid is where recall is half
way, in ln slots. With a dense baseline at the same base the floor can be fixed to its recall
(`floor=`), leaving three free parameters, which a three-size study can identify.

Fitted by bounded least squares on R (scipy `least_squares`, trust region reflective) from a small
grid of starts; `objective` is the sum of squared residuals. Parameters are optimised as
(floor, span, slope, mid) with ceiling = floor + span·(1 − floor), so the box bounds keep the order.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from memlayers.platform.laws import checks
from memlayers.platform.laws.bootstrap import intervals, resample_counts
from memlayers.platform.laws.logfit import one_blas_thread
from memlayers.platform.laws.result import LawFit

PARAM_NAMES = ("floor", "ceiling", "slope", "log_m_mid")
MAX_SLOPE = 20.0


def predict(params: dict[str, float], m: np.ndarray) -> np.ndarray:
    t = params["slope"] * (np.log(np.asarray(m, float)) - params["log_m_mid"])
    return params["floor"] + (params["ceiling"] - params["floor"]) * expit(t)


def _curve(z: np.ndarray, log_m: np.ndarray, floor: float | None) -> np.ndarray:
    lo, span, slope, mid = (floor, *z) if floor is not None else z
    return lo + span * (1.0 - lo) * expit(slope * (log_m - mid))


def _to_params(z: np.ndarray, floor: float | None) -> dict[str, float]:
    lo, span, slope, mid = (floor, *z) if floor is not None else z
    ceiling = lo + span * (1.0 - lo)
    return {"floor": float(lo), "ceiling": float(ceiling), "slope": float(slope), "log_m_mid": float(mid)}


def _solve(log_m, r, weights, starts, bounds, floor):
    best = None
    for z0 in starts:
        res = least_squares(lambda z: np.sqrt(weights) * (_curve(z, log_m, floor) - r), z0, bounds=bounds,
                            method="trf")
        if best is None or res.cost < best.cost:
            best = res
    return best.x, float(2.0 * best.cost)


@one_blas_thread
def fit_recall(m, recall, *, floor: float | None = None, bootstrap: int = 0, seed: int = 0,
               level: float = 0.95) -> LawFit:
    """Fit the logistic recall curve over memory sizes `m` (slots > 0)."""
    m = checks.as_column("M", m)
    r = checks.as_column("recall", recall, positive=False)
    checks.in_unit_interval("recall", r)
    count = checks.same_length(M=m, recall=r)
    n_free = 4 if floor is None else 3
    if floor is not None and not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor: must be in [0, 1], got {floor!r}")
    checks.enough_points(count, n_free, "recall")
    checks.distinct_values("M", m, n_free, "recall")
    log_m = np.log(m)
    mid_lo, mid_hi = log_m.min() - 3.0, log_m.max() + 3.0
    lower = [0.0, 0.0, mid_lo] if floor is not None else [0.0, 0.0, 0.0, mid_lo]
    upper = [1.0, MAX_SLOPE, mid_hi] if floor is not None else [1.0, 1.0, MAX_SLOPE, mid_hi]
    mids = np.quantile(log_m, [0.25, 0.5, 0.75])
    lo0 = [] if floor is not None else [max(0.0, float(r.min()) - 0.01)]
    starts = [np.array([*lo0, span, slope, mid])
              for span, slope, mid in itertools.product((0.5, 0.99), (0.5, 1.5, 4.0), mids)]
    z, objective = _solve(log_m, r, np.ones(count), starts, (lower, upper), floor)
    fit = LawFit(law="recall", params=_to_params(z, floor), objective=objective, n_points=count, inputs=["M"],
                 details={"objective": "sum of squared residuals", "floor_fixed": floor is not None})
    if bootstrap > 0:
        counts_BP = resample_counts(count, bootstrap, seed, groups=m, min_distinct=n_free)
        samples = {name: np.empty(bootstrap) for name in PARAM_NAMES}
        for b, w in enumerate(counts_BP):
            zb, _ = _solve(log_m, r, w, [z, starts[len(starts) // 2]], (lower, upper), floor)
            for name, value in _to_params(zb, floor).items():
                samples[name][b] = value
        fit.intervals = intervals(samples, level)
        fit.details["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                                    "method": "percentile, resampling points"}
    return fit
