"""L-BFGS for many small problems at once: one numpy evaluation serves every start.

A grid fit such as Chinchilla's (4,500 starts × 5 parameters) spends almost all of its time in
Python overhead when each start is optimised alone. Here all starts advance together: each loop
makes one vectorised call `fun_grad(x_SQ, rows_S)` for the problems still running, whether they
are taking a new step or backtracking (a problem never waits for another's line search).

Per problem this is ordinary L-BFGS with box bounds handled by projection: coordinates that sit
on a bound with the gradient pushing outwards are held, the two-loop recursion over the last
`history` pairs gives the step in the others (steepest descent when that is not downhill), a
backtracking Armijo line search (halving, at most `max_backtracks` tries) runs on the projected
step, pairs with non-positive curvature are skipped. Convergence mirrors scipy's L-BFGS-B
defaults: projected gradient max-norm ≤ `gtol`, or relative decrease
(f_k − f_k+1) / max(|f_k|, |f_k+1|, 1) ≤ `ftol`. Callers polish the best results with scipy's
L-BFGS-B, so this only has to bring every start to the bottom of its basin.

Legend: S problems, Q parameters, M history pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FunGrad = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class BatchResult:
    x_SQ: np.ndarray
    f_S: np.ndarray
    n_iter_S: np.ndarray
    converged_S: np.ndarray
    n_calls: int


def _dot(a_SQ: np.ndarray, b_SQ: np.ndarray) -> np.ndarray:
    return np.einsum("sq,sq->s", a_SQ, b_SQ)


def _direction(g_SQ: np.ndarray, s_SMQ: np.ndarray, y_SMQ: np.ndarray, rho_SM: np.ndarray) -> np.ndarray:
    """−H·g by the two-loop recursion; empty history slots have rho = 0 and drop out."""
    q_SQ = g_SQ.copy()
    m = rho_SM.shape[1]
    alpha_SM = np.zeros_like(rho_SM)
    for j in range(m - 1, -1, -1):
        alpha_SM[:, j] = rho_SM[:, j] * _dot(s_SMQ[:, j], q_SQ)
        q_SQ -= alpha_SM[:, j, None] * y_SMQ[:, j]
    yy_S = _dot(y_SMQ[:, -1], y_SMQ[:, -1])
    sy_S = _dot(s_SMQ[:, -1], y_SMQ[:, -1])
    gamma_S = np.where((rho_SM[:, -1] > 0) & (yy_S > 0), sy_S / np.where(yy_S > 0, yy_S, 1.0), 1.0)
    r_SQ = gamma_S[:, None] * q_SQ
    for j in range(m):
        beta_S = rho_SM[:, j] * _dot(y_SMQ[:, j], r_SQ)
        r_SQ += s_SMQ[:, j] * (alpha_SM[:, j] - beta_S)[:, None]
    return -r_SQ


def minimize_batch(
    fun_grad: FunGrad,
    x0_SQ: np.ndarray,
    *,
    lower_Q: np.ndarray | None = None,
    upper_Q: np.ndarray | None = None,
    history: int = 10,
    max_iter: int = 1000,
    gtol: float = 1e-5,
    ftol: float = 2.220446049250313e-09,
    max_backtracks: int = 20,
    c1: float = 1e-4,
) -> BatchResult:
    """Minimise S problems from the starts `x0_SQ`; `fun_grad(x, rows)` evaluates problems `rows`.

    Each loop makes exactly one call for all running problems: a problem whose trial step failed
    the Armijo test halves its step and tries again in the next loop while the others move on.
    """
    x_SQ = np.array(x0_SQ, dtype=float)
    n_problems, n_params = x_SQ.shape
    lo_Q = np.full(n_params, -np.inf) if lower_Q is None else np.asarray(lower_Q, float)
    hi_Q = np.full(n_params, np.inf) if upper_Q is None else np.asarray(upper_Q, float)
    x_SQ = np.clip(x_SQ, lo_Q, hi_Q)
    f_S, g_SQ = fun_grad(x_SQ, np.arange(n_problems))
    n_calls = 1
    s_SMQ = np.zeros((n_problems, history, n_params))
    y_SMQ = np.zeros_like(s_SMQ)
    rho_SM = np.zeros((n_problems, history))
    d_SQ = np.zeros_like(x_SQ)
    step_S = np.zeros(n_problems)
    tries_S = np.zeros(n_problems, dtype=int)
    needs_direction_S = np.ones(n_problems, dtype=bool)
    n_iter_S = np.zeros(n_problems, dtype=int)
    converged_S = np.abs(np.clip(x_SQ - g_SQ, lo_Q, hi_Q) - x_SQ).max(axis=1) <= gtol
    active_S = ~converged_S & np.isfinite(f_S)

    while active_S.any():
        fresh = np.flatnonzero(active_S & needs_direction_S)
        if fresh.size:
            x_FQ, g_FQ = x_SQ[fresh], g_SQ[fresh]
            # coordinates held at a bound by the gradient stay put; the step lives in the free ones
            held_FQ = ((x_FQ <= lo_Q) & (g_FQ > 0)) | ((x_FQ >= hi_Q) & (g_FQ < 0))
            free_g_FQ = np.where(held_FQ, 0.0, g_FQ)
            d_FQ = _direction(free_g_FQ, s_SMQ[fresh], y_SMQ[fresh], rho_SM[fresh])
            d_FQ[held_FQ] = 0.0
            uphill = _dot(free_g_FQ, d_FQ) >= 0
            d_FQ[uphill] = -free_g_FQ[uphill]
            rho_SM[fresh[uphill]] = 0.0  # restart the memory where it stopped giving descent
            empty = rho_SM[fresh].max(axis=1) == 0
            norm_F = np.maximum(np.linalg.norm(d_FQ, axis=1), 1e-300)
            d_SQ[fresh], step_S[fresh] = d_FQ, np.where(empty, np.minimum(1.0, 1.0 / norm_F), 1.0)
            tries_S[fresh], needs_direction_S[fresh] = 0, False

        rows = np.flatnonzero(active_S)
        x_AQ = x_SQ[rows]
        trial_AQ = np.clip(x_AQ + step_S[rows, None] * d_SQ[rows], lo_Q, hi_Q)
        slope_A = _dot(g_SQ[rows], trial_AQ - x_AQ)
        flat = slope_A >= 0  # the projected step cannot go down: a (bound-constrained) minimum
        converged_S[rows[flat]], active_S[rows[flat]] = True, False
        rows, x_AQ, trial_AQ, slope_A = rows[~flat], x_AQ[~flat], trial_AQ[~flat], slope_A[~flat]
        if rows.size == 0:
            continue
        f_A, g_AQ = fun_grad(trial_AQ, rows)
        n_calls += 1
        ok = np.isfinite(f_A) & (f_A <= f_S[rows] + c1 * slope_A)

        failed = rows[~ok]
        step_S[failed] *= 0.5
        tries_S[failed] += 1
        gave_up = failed[tries_S[failed] >= max_backtracks]
        converged_S[gave_up], active_S[gave_up] = True, False

        idx = rows[ok]
        s_BQ = trial_AQ[ok] - x_AQ[ok]
        y_BQ = g_AQ[ok] - g_SQ[idx]
        sy_B = _dot(s_BQ, y_BQ)
        keep = sy_B > 1e-10 * _dot(y_BQ, y_BQ)
        upd = idx[keep]
        s_SMQ[upd] = np.roll(s_SMQ[upd], -1, axis=1)
        y_SMQ[upd] = np.roll(y_SMQ[upd], -1, axis=1)
        rho_SM[upd] = np.roll(rho_SM[upd], -1, axis=1)
        s_SMQ[upd, -1], y_SMQ[upd, -1], rho_SM[upd, -1] = s_BQ[keep], y_BQ[keep], 1.0 / sy_B[keep]

        f_old_B = f_S[idx]
        x_SQ[idx], f_S[idx], g_SQ[idx] = trial_AQ[ok], f_A[ok], g_AQ[ok]
        n_iter_S[idx] += 1
        needs_direction_S[idx] = True
        pg_B = np.abs(np.clip(x_SQ[idx] - g_SQ[idx], lo_Q, hi_Q) - x_SQ[idx]).max(axis=1)
        scale_B = np.maximum(np.maximum(np.abs(f_old_B), np.abs(f_S[idx])), 1.0)
        done_B = (pg_B <= gtol) | (f_old_B - f_S[idx] <= ftol * scale_B)
        converged_S[idx[done_B]], active_S[idx[done_B]] = True, False
        active_S[idx[n_iter_S[idx] >= max_iter]] = False
    return BatchResult(x_SQ=x_SQ, f_S=f_S, n_iter_S=n_iter_S, converged_S=converged_S, n_calls=n_calls)
