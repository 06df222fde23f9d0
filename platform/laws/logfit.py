"""Log-space Huber fits of a sum of power terms plus a constant, the core of Chinchilla-style laws.

Model: y = E + Σ_k A_k·x_k^(−p_k), fitted on log y as
    log ŷ = logsumexp(c_1 − p_1·u_1, …, c_K − p_K·u_K, e),   u_k = log x_k, c_k = log A_k, e = log E,
with the Huber loss (threshold δ) of the residuals log ŷ − log y, summed over points (optionally
weighted: bootstrap replicates are integer weights). The gradient is analytic: with
π = softmax of the terms and h'(r) = clip(r, −δ, δ),
    ∂/∂c_k = Σ h'·π_k,   ∂/∂p_k = −Σ h'·π_k·u_k,   ∂/∂e = Σ h'·π_e.
Since Huber(r) = h'(r)·(r − h'(r)/2), value and gradient share every array.

`fit_starts` runs all starts together (`lbfgs.minimize_batch`) and polishes the best few with
scipy's L-BFGS-B; `fit_replicates` refits many weighted replicates at once (the bootstrap).

Legend: S problems (starts, or starts × replicates), P points, K power terms,
Q = 2K + 1 parameters laid out [c_1 … c_K, e, p_1 … p_K], B replicates, G starts per replicate.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from memlayers.platform.laws.bootstrap import resample_counts
from memlayers.platform.laws.lbfgs import minimize_batch


def one_blas_thread(fit):
    """Run `fit` with BLAS limited to one thread (threadpoolctl, when installed).

    The problems here are tiny; a multi-threaded BLAS spends far more time waking and spinning
    its threads than computing (scipy's L-BFGS-B was measured 3-25x slower per call with two
    threads on a busy two-core machine).
    """

    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits  # deferred: only this path needs threadpoolctl
        except ImportError:
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=1, user_api="blas")
        with limits:
            return fit(*args, **kwargs)

    return wrapper


POLISH_OPTIONS = {"ftol": 1e-15, "gtol": 1e-11, "maxiter": 15000, "maxfun": 15000}


@dataclass(frozen=True)
class PowerSumProblem:
    """Points of one fit: log inputs `u_PK`, log targets `v_P`, Huber threshold `delta`."""

    u_PK: np.ndarray
    v_P: np.ndarray
    delta: float = 1e-3

    @property
    def n_terms(self) -> int:
        return self.u_PK.shape[1]

    def fun_grad(self, theta_SQ: np.ndarray, weights_SP: np.ndarray | None = None,
                 chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Summed Huber loss of the log residuals (S,) and its gradient (S, Q).

        Rows are processed in chunks that keep the S × P temporaries in cache, in place.
        """
        theta_SQ = np.atleast_2d(np.asarray(theta_SQ, float))
        f_S = np.empty(theta_SQ.shape[0])
        g_SQ = np.empty_like(theta_SQ)
        for lo in range(0, theta_SQ.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            w_SP = None if weights_SP is None else weights_SP[rows]
            f_S[rows], g_SQ[rows] = self._fun_grad_chunk(theta_SQ[rows], w_SP)
        f_S[~np.isfinite(f_S)] = np.inf
        return f_S, g_SQ

    def _fun_grad_chunk(self, theta_SQ: np.ndarray, weights_SP: np.ndarray | None):
        k_terms, u_PK = self.n_terms, self.u_PK
        e_S1 = theta_SQ[:, k_terms, None]
        # terms z_k = c_k − p_k·u_k, turned in place into exp(z_k − top)
        ez_KSP = [theta_SQ[:, k, None] - theta_SQ[:, k_terms + 1 + k, None] * u_PK[:, k] for k in range(k_terms)]
        top_SP = np.maximum(ez_KSP[0], e_S1)
        for z_SP in ez_KSP[1:]:
            np.maximum(top_SP, z_SP, out=top_SP)
        for z_SP in ez_KSP:
            np.subtract(z_SP, top_SP, out=z_SP)
            np.exp(z_SP, out=z_SP)
        ee_SP = np.exp(e_S1 - top_SP)
        total_SP = ee_SP.copy()
        for ez_SP in ez_KSP:
            total_SP += ez_SP
        r_SP = np.log(total_SP)
        r_SP += top_SP
        r_SP -= self.v_P
        slope_SP = np.minimum(r_SP, self.delta)
        np.maximum(slope_SP, -self.delta, out=slope_SP)
        r_SP -= 0.5 * slope_SP
        r_SP *= slope_SP  # now the Huber loss of each residual
        if weights_SP is not None:
            r_SP *= weights_SP
            slope_SP *= weights_SP
        f_S = r_SP.sum(axis=1)
        slope_SP /= total_SP
        g_SQ = np.empty_like(theta_SQ)
        g_SQ[:, k_terms] = np.einsum("sp,sp->s", slope_SP, ee_SP)
        for k, ez_SP in enumerate(ez_KSP):
            ez_SP *= slope_SP
            g_SQ[:, k] = ez_SP.sum(axis=1)
            g_SQ[:, k_terms + 1 + k] = -(ez_SP @ u_PK[:, k])
        return f_S, g_SQ


@dataclass
class StartsFit:
    theta_Q: np.ndarray
    objective: float
    n_starts: int
    n_at_best: int  # starts that ended within 1e-9 of the best objective (before polishing)
    batch_calls: int


def _bounds_arrays(bounds, n_params):
    if bounds is None:
        return None, None
    lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds], float)
    hi = np.array([np.inf if b[1] is None else b[1] for b in bounds], float)
    if len(lo) != n_params:
        raise ValueError(f"bounds: expected {n_params} pairs, got {len(lo)}")
    return lo, hi


def polish(problem: PowerSumProblem, theta_Q: np.ndarray, bounds=None, weights_P: np.ndarray | None = None):
    """scipy L-BFGS-B with the analytic gradient from one start -> (theta, objective).

    Tolerances are tighter than scipy's defaults, whose ftol is relative to max(|f|, 1) and so
    stops early on objectives far below 1 (a good log-space fit has f ~ 1e-6 … 1e-3).
    """
    w = None if weights_P is None else weights_P[None, :]

    def fun(theta_Q):
        f_S, g_SQ = problem.fun_grad(theta_Q[None, :], w)
        return float(f_S[0]), g_SQ[0]

    result = minimize(fun, np.asarray(theta_Q, float), jac=True, method="L-BFGS-B", bounds=bounds,
                      options=POLISH_OPTIONS)
    return result.x, float(result.fun)


@one_blas_thread
def fit_starts(
    problem: PowerSumProblem,
    starts_SQ: np.ndarray,
    *,
    bounds: list[tuple[float | None, float | None]] | None = None,
    n_polish: int = 3,
    max_iter: int = 1000,
) -> StartsFit:
    """Optimise from every start (all at once), polish the best `n_polish`, return the best."""
    starts_SQ = np.asarray(starts_SQ, float)
    lo_Q, hi_Q = _bounds_arrays(bounds, starts_SQ.shape[1])

    def fun_grad(theta_SQ, rows):
        return problem.fun_grad(theta_SQ)

    batch = minimize_batch(fun_grad, starts_SQ, lower_Q=lo_Q, upper_Q=hi_Q, max_iter=max_iter)
    order = np.argsort(batch.f_S)
    best_theta, best_f = batch.x_SQ[order[0]], float(batch.f_S[order[0]])
    for i in order[:n_polish]:
        theta, f = polish(problem, batch.x_SQ[i], bounds)
        if f < best_f:
            best_theta, best_f = theta, f
    n_at_best = int((batch.f_S <= batch.f_S[order[0]] + 1e-9).sum())
    return StartsFit(best_theta, best_f, len(starts_SQ), n_at_best, batch.n_calls)


@one_blas_thread
def fit_replicates(
    problem: PowerSumProblem,
    weights_BP: np.ndarray,
    starts_GQ: np.ndarray,
    *,
    bounds: list[tuple[float | None, float | None]] | None = None,
    max_iter: int = 1000,
    ftol: float = 1e-13,
    gtol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Refit B weighted replicates from the same G starts each -> best theta (B, Q), objective (B,).

    The tolerances are tighter than scipy's defaults: a replicate starts at (or next to) an
    optimum of an objective of order 1e-3, where scipy's ftol (relative to max(|f|, 1)) would
    stop at once.
    """
    weights_BP = np.asarray(weights_BP, float)
    starts_GQ = np.atleast_2d(np.asarray(starts_GQ, float))
    n_rep, n_starts = weights_BP.shape[0], starts_GQ.shape[0]
    replicate_S = np.repeat(np.arange(n_rep), n_starts)
    lo_Q, hi_Q = _bounds_arrays(bounds, starts_GQ.shape[1])

    def fun_grad(theta_SQ, rows):
        return problem.fun_grad(theta_SQ, weights_BP[replicate_S[rows]])

    batch = minimize_batch(fun_grad, np.tile(starts_GQ, (n_rep, 1)), lower_Q=lo_Q, upper_Q=hi_Q,
                           max_iter=max_iter, ftol=ftol, gtol=gtol)
    f_BG = batch.f_S.reshape(n_rep, n_starts)
    best_B = np.argmin(f_BG, axis=1)
    theta_BQ = batch.x_SQ.reshape(n_rep, n_starts, -1)[np.arange(n_rep), best_B]
    return theta_BQ, f_BG[np.arange(n_rep), best_B]


def bootstrap_theta(
    problem: PowerSumProblem,
    best_Q: np.ndarray,
    grid_GQ: np.ndarray,
    *,
    n_replicates: int,
    seed: int,
    n_grid_starts: int = 2,
    bounds: list[tuple[float | None, float | None]] | None = None,
    groups: np.ndarray | None = None,
    min_distinct: int = 1,
    max_iter: int = 1000,
) -> np.ndarray:
    """Bootstrap refits (B, Q): each replicate starts from the full-data optimum and a few grid starts."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(grid_GQ), size=min(n_grid_starts, len(grid_GQ)), replace=False)
    starts_GQ = np.vstack([best_Q[None, :], np.asarray(grid_GQ, float)[picks]])
    counts_BP = resample_counts(len(problem.v_P), n_replicates, seed, groups=groups, min_distinct=min_distinct)
    theta_BQ, _ = fit_replicates(problem, counts_BP, starts_GQ, bounds=bounds, max_iter=max_iter)
    return theta_BQ
