"""One power law with an irreducible term: L(x) = E + A·x^(−α).

Two uses: the compute law of a model family, L(C) with exponent `alpha`, and the memory-size law
at a fixed base model and budget, L(M) with exponent `gamma` (also for losses of the recall probe,
such as the answer NLL). The fit follows Chinchilla's recipe (`logfit`): log space, Huber δ = 1e-3
on log residuals summed, analytic gradient, all starts optimised at once, best polished by scipy's
L-BFGS-B. The input is normalised by its geometric mean x_ref, so one start grid serves FLOPs
(~1e15) and slot counts (~1e4) alike:
    log L̂ = logsumexp(ã − α·log(x / x_ref), e),   then log A = ã + α·log x_ref.
Starts: E ∈ {0.05, 0.3, 0.6, 0.9}·min L, A·x_ref^(−α) ∈ {0.25, 1, 4}·(geomean L − E),
α ∈ {0.05, 0.15, 0.3, 0.6, 1.2, 2.5}. The exponent is bounded to [0, 10], so a fitted law never
increases with x.
"""

from __future__ import annotations

import itertools

import numpy as np

from memlayers.platform.laws import checks
from memlayers.platform.laws.bootstrap import intervals
from memlayers.platform.laws.logfit import PowerSumProblem, bootstrap_theta, fit_starts
from memlayers.platform.laws.result import LawFit

EXPONENT = {"compute": "alpha", "memory": "gamma"}
INPUT = {"compute": "C", "memory": "M"}
N_PARAMS = 3
EXPONENT_BOUNDS = (0.0, 10.0)
BOUNDS = [(None, None), (None, None), EXPONENT_BOUNDS]
MAX_ITER = 150  # batched screening only: the best starts are then polished by scipy's L-BFGS-B


def predict(params: dict[str, float], x: np.ndarray) -> np.ndarray:
    exponent = params["alpha"] if "alpha" in params else params["gamma"]
    return params["E"] + params["A"] * np.asarray(x, float) ** -exponent


def _starts(y: np.ndarray) -> np.ndarray:
    floor = float(y.min())
    middle = float(np.exp(np.log(y).mean()))
    rows = []
    for e_frac, a_frac, exponent in itertools.product((0.05, 0.3, 0.6, 0.9), (0.25, 1.0, 4.0),
                                                       (0.05, 0.15, 0.3, 0.6, 1.2, 2.5)):
        e = e_frac * floor
        rows.append((np.log(a_frac * max(middle - e, 1e-3 * floor)), np.log(e), exponent))
    return np.array(rows)


MIN_SPAN = 1.5  # max/min of the input: a narrower range leaves the exponent unidentified


def _problem(x, y, law: str, delta: float):
    if law not in EXPONENT:
        raise ValueError(f"law: expected one of {sorted(EXPONENT)}, got {law!r}")
    x = checks.as_column(INPUT[law], x)
    y = checks.as_column("loss", y)
    count = checks.same_length(x=x, loss=y)
    checks.enough_points(count, N_PARAMS, law)
    checks.distinct_values(INPUT[law], x, N_PARAMS, law)
    checks.spans(INPUT[law], x, MIN_SPAN, law)
    log_ref = float(np.log(x).mean())
    prob = PowerSumProblem(u_PK=(np.log(x) - log_ref)[:, None], v_P=np.log(y), delta=delta)
    return x, y, prob, log_ref


def _params(theta_Q: np.ndarray, law: str, log_ref: float) -> dict[str, float]:
    a_norm, e, exponent = (float(v) for v in theta_Q)
    return {"A": float(np.exp(a_norm + exponent * log_ref)), "E": float(np.exp(e)), EXPONENT[law]: exponent}


def _theta(params: dict[str, float], law: str, log_ref: float) -> np.ndarray:
    exponent = params[EXPONENT[law]]
    return np.array([np.log(params["A"]) - exponent * log_ref, np.log(params["E"]), exponent])


def fit_power_law(x, y, *, law: str = "compute", delta: float = 1e-3, bootstrap: int = 0,
                  seed: int = 0, level: float = 0.95) -> LawFit:
    """Fit L(x) = E + A·x^(−exponent) for `law` "compute" (x = C) or "memory" (x = M)."""
    x, y, prob, log_ref = _problem(x, y, law, delta)
    best = fit_starts(prob, _starts(y), bounds=BOUNDS, max_iter=MAX_ITER)
    fit = LawFit(
        law=law,
        params=_params(best.theta_Q, law, log_ref),
        objective=best.objective,
        n_points=len(y),
        inputs=[INPUT[law]],
        details={"x_ref": float(np.exp(log_ref)), "huber_delta": delta, "n_starts": best.n_starts},
    )
    exponent = fit.params[EXPONENT[law]]
    if exponent <= EXPONENT_BOUNDS[0] + 1e-3 or exponent >= 0.95 * EXPONENT_BOUNDS[1]:  # the flat direction stops short
        fit.details["warning"] = (f"{EXPONENT[law]} = {exponent:.3g} sits at its bound {EXPONENT_BOUNDS}: "
                                  f"the points do not determine a power law")
    if bootstrap > 0:
        if len(np.unique(x)) <= N_PARAMS:
            fit.details["bootstrap"] = {"skipped": f"{len(np.unique(x))} distinct {INPUT[law]} values for "
                                                  f"{N_PARAMS} parameters: every replicate is the same fit"}
        else:
            fit.intervals = intervals(bootstrap_samples(fit, x, y, bootstrap, seed), level)
            fit.details["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                                        "method": "percentile, resampling points"}
    return fit


def bootstrap_samples(fit: LawFit, x, y, n_replicates: int, seed: int) -> dict[str, np.ndarray]:
    """Parameters refitted on `n_replicates` resamples of the points (seeded): name -> (B,) array."""
    x, y, prob, log_ref = _problem(x, y, fit.law, fit.details.get("huber_delta", 1e-3))
    theta_BQ = bootstrap_theta(prob, _theta(fit.params, fit.law, log_ref), _starts(y), n_replicates=n_replicates,
                               seed=seed, bounds=BOUNDS, groups=x, min_distinct=N_PARAMS, max_iter=MAX_ITER)
    rows = [_params(t, fit.law, log_ref) for t in theta_BQ]
    return {name: np.array([r[name] for r in rows]) for name in rows[0]}
