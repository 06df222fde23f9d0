"""Chinchilla's approach 3: L(N, D) = E + A/N^α + B/D^β fitted as Hoffmann et al. and Epoch AI did.

N parameters, D training tokens (D = C / (6N) when only compute C is known). The fit is in
log space: with a = log A, b = log B, e = log E,
    log L̂ = logsumexp(a − α·log N, b − β·log D, e),
minimising the Huber loss (δ = 1e-3) of log L̂ − log L summed over points, by L-BFGS-B with
analytic gradients from the 4,500-start grid a, b ∈ {0, 5, …, 25}, e ∈ {−1, −0.5, …, 1},
α, β ∈ {0, 0.5, …, 2}. All starts are optimised together (`logfit.fit_starts`), which is what
makes the full grid fast. Bootstrap replicates resample points and refit from the full-data
optimum plus a few grid starts.
"""

from __future__ import annotations

import itertools

import numpy as np

from memlayers.platform.laws import checks
from memlayers.platform.laws.bootstrap import intervals
from memlayers.platform.laws.frontier import frontier_constants
from memlayers.platform.laws.logfit import PowerSumProblem, bootstrap_theta, fit_starts
from memlayers.platform.laws.result import LawFit

PARAM_NAMES = ("A", "B", "E", "alpha", "beta")
INPUTS = ["N", "D"]
N_PARAMS = 5


def grid_starts() -> np.ndarray:
    """The 4,500 starts (a, b, e, α, β) of the published procedure."""
    ab = np.arange(0.0, 30.0, 5.0)
    e = np.arange(-1.0, 1.5, 0.5)
    exps = np.arange(0.0, 2.5, 0.5)
    return np.array(list(itertools.product(ab, ab, e, exps, exps)), dtype=float)


def params_from_theta(theta_Q: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(v) for v in theta_Q)
    return {"A": float(np.exp(a)), "B": float(np.exp(b)), "E": float(np.exp(e)), "alpha": alpha, "beta": beta}


def predict(params: dict[str, float], n: np.ndarray, d: np.ndarray) -> np.ndarray:
    n, d = np.asarray(n, float), np.asarray(d, float)
    return params["E"] + params["A"] * n ** -params["alpha"] + params["B"] * d ** -params["beta"]


def tokens_from_compute(n: np.ndarray, c: np.ndarray) -> np.ndarray:
    """D = C / (6N): training tokens of a run of N parameters that spent C FLOPs."""
    return np.asarray(c, float) / (6.0 * np.asarray(n, float))


def problem(n, d, loss, delta: float = 1e-3) -> PowerSumProblem:
    """Validated points as a log-space problem; ValueError on degenerate input."""
    n, d, loss = checks.as_column("N", n), checks.as_column("D", d), checks.as_column("loss", loss)
    count = checks.same_length(N=n, D=d, loss=loss)
    checks.enough_points(count, N_PARAMS, "chinchilla")
    checks.distinct_values("N (model size)", n, 2, "chinchilla")
    checks.distinct_values("D (tokens)", d, 2, "chinchilla")
    return PowerSumProblem(u_PK=np.column_stack([np.log(n), np.log(d)]), v_P=np.log(loss), delta=delta)


def fit_chinchilla(n, d, loss, *, delta: float = 1e-3, starts: np.ndarray | None = None,
                   bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> LawFit:
    """Fit L(N, D) by the grid procedure; with `bootstrap` > 0 add percentile intervals."""
    prob = problem(n, d, loss, delta)
    grid = grid_starts() if starts is None else np.asarray(starts, float)
    best = fit_starts(prob, grid)
    fit = LawFit(
        law="chinchilla",
        params=params_from_theta(best.theta_Q),
        objective=best.objective,
        n_points=len(prob.v_P),
        inputs=list(INPUTS),
        details={
            "log_params": dict(zip(("a", "b", "e", "alpha", "beta"), map(float, best.theta_Q))),
            "huber_delta": delta,
            "n_starts": best.n_starts,
            "starts_at_best": best.n_at_best,
        },
    )
    if bootstrap > 0:
        theta_BQ = bootstrap_theta(prob, best.theta_Q, grid, n_replicates=bootstrap, seed=seed)
        samples = {name: np.array([params_from_theta(t)[name] for t in theta_BQ]) for name in PARAM_NAMES}
        fit.intervals = intervals(samples, level)
        fit.details["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                                    "method": "percentile, resampling points"}
    fit.details["frontier"] = frontier_constants(fit.params)
    return fit
