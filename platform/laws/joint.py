"""The joint law L(N, M, D): every candidate form fitted, bootstrapped, scored on held-out points.

N active parameters, M memory (value-table) parameters, D training tokens; dense rows (M = 0)
and memory rows are fitted together. Each form (`joint_forms`) is fitted as Chinchilla's
approach 3 is (`logfit`): log space, Huber δ = 1e-3 on log residuals summed, analytic gradient,
all starts optimised at once by the batched L-BFGS and the best polished by scipy's L-BFGS-B.
Starts: the dense parameters of a Chinchilla fit (the 4,500-start grid) of the dense rows (of
all rows, M ignored, when the dense rows cannot identify it) and a few seeded grid points,
crossed with each form's memory starts. Without memory rows the memory parameters are not
identified: each form is then Chinchilla's law itself, fitted from the full grid, and its
memory parameters are null.

Bootstrap replicates resample the points (each keeps at least three memory sizes) and refit
from the optimum and two other starts; intervals are percentile intervals, and the replicates'
parameters are kept in the record, so `predict` and `plan` give intervals too. The form is
chosen by held-out error (`holdout`). MoE rows, when there are any, get a Chinchilla fit of
their own (N = active parameters), the MoE optimum of `plan`.

`fit_joint` returns the joint.json record (kind `KIND`, `VERSION`); `load_joint` reads one back
and refuses another kind or version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlayers.platform.laws import checks
from memlayers.platform.laws.bootstrap import intervals
from memlayers.platform.laws.chinchilla import fit_chinchilla, grid_starts
from memlayers.platform.laws.chinchilla import problem as chinchilla_problem
from memlayers.platform.laws.holdout import choose, held_out_errors
from memlayers.platform.laws.joint_forms import DENSE, FORMS, Form, Inputs, dense_loss, dense_params, form
from memlayers.platform.laws.logfit import bootstrap_theta, fit_replicates, fit_starts
from memlayers.platform.laws.result import FITTER_VERSION

KIND = "memlayers.joint_law"
VERSION = 1
N_GRID_STARTS = 3   # seeded Chinchilla-grid points crossed with a form's memory starts
MIN_MEMORY_SIZES = 3
SCREEN_ITER = 200


@dataclass(frozen=True)
class JointProblem:
    """Points of one form's fit (log space), with the interface of `logfit.PowerSumProblem`."""

    form: Form
    x: Inputs
    v_P: np.ndarray
    delta: float = 1e-3

    def fun_grad(self, theta_SQ: np.ndarray, weights_SP: np.ndarray | None = None,
                 chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Summed Huber loss of the log residuals (S,) and its gradient (S, Q), as `logfit`'s."""
        theta_SQ = np.atleast_2d(np.asarray(theta_SQ, float))
        f_S, g_SQ = np.empty(theta_SQ.shape[0]), np.zeros_like(theta_SQ)
        for lo in range(0, theta_SQ.shape[0], chunk):
            rows = slice(lo, lo + chunk)
            terms = self.form.terms(theta_SQ[rows], self.x)
            z_KSP = np.stack([z for z, _ in terms])
            top_SP = z_KSP.max(axis=0)
            w_KSP = np.exp(z_KSP - top_SP)
            total_SP = w_KSP.sum(axis=0)
            r_SP = top_SP + np.log(total_SP) - self.v_P
            slope_SP = np.clip(r_SP, -self.delta, self.delta)
            huber_SP = slope_SP * (r_SP - 0.5 * slope_SP)
            if weights_SP is not None:
                huber_SP, slope_SP = huber_SP * weights_SP[rows], slope_SP * weights_SP[rows]
            f_S[rows] = huber_SP.sum(axis=1)
            slope_SP /= total_SP
            for k, (_, dz) in enumerate(terms):  # Σ_p h'·softmax_k·∂z_k/∂θ_q, term by term
                pull_SP = w_KSP[k] * slope_SP
                for q, dz_q in dz.items():
                    g_SQ[rows, q] += (pull_SP * dz_q).sum(axis=1)
        bad = ~np.isfinite(f_S)
        f_S[bad], g_SQ[bad] = np.inf, 0.0
        return f_S, g_SQ


@dataclass(frozen=True)
class Points:
    n: np.ndarray
    m: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    m_ref: float
    n_ref: float
    base: np.ndarray    # base model label per point (leave-one-base-out)

    @classmethod
    def checked(cls, n, m, d, loss, base=None) -> "Points":
        n, d, loss = checks.as_column("N", n), checks.as_column("D", d), checks.as_column("loss", loss)
        m = checks.as_column("M", m, positive=False)
        count = checks.same_length(N=n, M=m, D=d, loss=loss)
        if np.any(m < 0):
            raise ValueError(f"M: {(m < 0).sum()} value(s) are negative")
        checks.enough_points(count, len(DENSE) + 2, "joint")
        checks.distinct_values("N (model size)", n, 2, "joint")
        checks.distinct_values("D (tokens)", d, 2, "joint")
        sizes = np.unique(m[m > 0]).size
        if 0 < sizes < MIN_MEMORY_SIZES:
            raise ValueError(f"M: {sizes} distinct memory size(s) > 0; the joint law needs {MIN_MEMORY_SIZES} "
                             "(or none: the dense law alone)")
        m_ref = float(np.exp(np.log(m[m > 0]).mean())) if sizes else 1.0
        base = n if base is None else np.asarray(base)
        if len(base) != count:
            raise ValueError(f"base: {len(base)} labels for {count} points")
        return cls(n, m, d, loss, m_ref, float(np.exp(np.log(n).mean())), base)

    @property
    def has_memory(self) -> bool:
        return bool(np.any(self.m > 0))

    def subset(self, mask: np.ndarray) -> "Points":
        return Points(self.n[mask], self.m[mask], self.d[mask], self.loss[mask], self.m_ref, self.n_ref,
                      self.base[mask])

    def problem(self, f: Form, delta: float = 1e-3):
        """The form's problem; without memory rows Chinchilla's own (same θ, the first five slots)."""
        if not self.has_memory:
            return chinchilla_problem(self.n, self.d, self.loss, delta)
        x = Inputs.from_points(self.n, self.m, self.d, self.m_ref, self.n_ref)
        return JointProblem(f, x, np.log(self.loss), delta)


def dense_seed(points: Points) -> np.ndarray:
    """θ of a Chinchilla fit: of the dense rows when they identify it, else of all rows (M ignored).

    A seed only: the grid is thinned to e ∈ {−1, 0, 1}, α, β ∈ {0.5, 1} (432 starts)."""
    dense = points.m == 0
    use = dense if (dense.sum() >= len(DENSE) and np.unique(points.n[dense]).size >= 2
                    and np.unique(points.d[dense]).size >= 2) else np.ones_like(dense)
    grid = grid_starts()
    coarse = grid[np.isin(grid[:, 2], (-1.0, 0.0, 1.0)) & np.isin(grid[:, 3], (0.5, 1.0))
                  & np.isin(grid[:, 4], (0.5, 1.0))]
    best = fit_starts(chinchilla_problem(points.n[use], points.d[use], points.loss[use]), coarse, n_polish=1,
                      max_iter=SCREEN_ITER)
    return best.theta_Q


def starts_for(points: Points, f: Form, seed_Q: np.ndarray, seed: int) -> np.ndarray:
    """The seed and N_GRID_STARTS grid points (dense part) crossed with the form's memory starts;
    without memory rows, the full Chinchilla grid (five columns)."""
    grid = grid_starts()
    if not points.has_memory:
        return grid
    picks = np.random.default_rng(seed).choice(len(grid), N_GRID_STARTS, replace=False)
    dense = np.vstack([seed_Q[None, :5], grid[picks]])
    memory = np.asarray(f.memory_starts, float)
    return np.hstack([np.repeat(dense, len(memory), axis=0), np.tile(memory, (len(dense), 1))])


def _fit_theta(points: Points, f: Form, starts: np.ndarray) -> tuple[np.ndarray, float]:
    if not points.has_memory:  # Chinchilla's own procedure, as `fit_chinchilla` runs it
        best = fit_starts(points.problem(f), starts)
    else:  # batched screening only: the best start is then polished by scipy's L-BFGS-B
        best = fit_starts(points.problem(f), starts, bounds=f.bounds, n_polish=1, max_iter=SCREEN_ITER)
    return best.theta_Q, best.objective


def _params(f: Form, theta_Q: np.ndarray, dense_only: bool) -> dict:
    return {**dense_params(theta_Q), **{k: None for k in f.memory}} if dense_only else f.params(theta_Q)


def predict(entry: dict, law: dict, n, m, d) -> np.ndarray:
    """A form's loss at (N, M, D); `entry["params"]` may hold arrays (replicates)."""
    m = np.asarray(m, float)
    params = entry["params"]
    if np.any(m > 0) and any(params[k] is None for k in form(entry["form"]).memory):
        raise ValueError("M: the law was fitted without memory rows; it predicts only M = 0")
    if all(params[k] is None for k in form(entry["form"]).memory):
        return dense_loss(params, n, d)
    return form(entry["form"]).predict(params, n, m, d, law["m_ref"], law["n_ref"])


def replicate_params(entry: dict) -> dict[str, np.ndarray]:
    """The bootstrap replicates' parameters of a form: name -> (R,) array ({} without a bootstrap)."""
    reps = entry.get("replicates")
    if not reps:
        return {}
    values = np.array([[np.nan if v is None else v for v in row] for row in reps["values"]], float)
    return {name: values[:, i] for i, name in enumerate(reps["names"])}


def fit_form(points: Points, f: Form, seed_Q: np.ndarray, *, bootstrap: int = 0, seed: int = 0,
             level: float = 0.95, held_out: bool = True) -> dict:
    """One form's record: params, objective, intervals and replicates, held-out errors."""
    dense_only = not points.has_memory
    starts = starts_for(points, f, seed_Q, seed)
    theta, objective = _fit_theta(points, f, starts)
    entry: dict = {"form": f.name, "description": f.description, "objective": objective,
                   "params": _params(f, theta, dense_only), "n_starts": len(starts)}
    entry["log_rmse"] = float(np.sqrt(np.mean((np.log(predict(entry, points_law(points), points.n, points.m,
                                                                   points.d)) - np.log(points.loss)) ** 2)))
    if dense_only:
        entry["note"] = "no memory rows: the memory parameters are not identified; the form is Chinchilla's law"
    else:
        at_bound = [name for name, value, (lo, hi) in zip(f.memory, theta[5:], f.memory_bounds)
                    if min(value - lo, hi - value) < 1e-3]
        if at_bound:
            entry["warning"] = (f"{', '.join(at_bound)} at the bound of the search range: "
                                "the points do not determine it")
    if bootstrap > 0:
        prob = points.problem(f)
        names = DENSE if dense_only else f.param_names
        sizes = np.unique(points.m).size
        theta_BQ = bootstrap_theta(prob, theta, starts, n_replicates=bootstrap,
                                   seed=seed, bounds=None if dense_only else f.bounds, groups=points.m,
                                   min_distinct=min(sizes, MIN_MEMORY_SIZES + 1))
        rows = [[_params(f, t, dense_only)[k] for k in names] for t in theta_BQ]
        entry["replicates"] = {"names": list(names), "values": rows}
        entry["intervals"] = intervals({k: np.array([r[i] for r in rows]) for i, k in enumerate(names)}, level)
        entry["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                              "method": "percentile, resampling points"}
    if held_out:
        entry["held_out"] = held_out_errors(lambda train_KP: _refit(points, f, train_KP, theta),
                                            points.n, points.d, points.loss, points.base)
    return entry


def _refit(points: Points, f: Form, train_KP: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The form refitted on each row of training masks at once (0/1 weights on the points), from the
    full fit's optimum; predictions (K, P) at every point."""
    for train in train_KP:
        if points.has_memory and not np.any(points.m[train] > 0):
            raise ValueError("a fold leaves no memory rows to fit on")
        checks.enough_points(int(train.sum()), theta.size, "joint (held out)")
    # held-out predictions need ~1e-4 relative precision, not the bootstrap's tolerances
    theta_KQ, _ = fit_replicates(points.problem(f), train_KP.astype(float), theta[None, :],
                                 bounds=f.bounds if points.has_memory else None, max_iter=SCREEN_ITER,
                                 ftol=1e-11, gtol=1e-7)
    law = points_law(points)
    return np.array([predict({"form": f.name, "params": _params(f, t, not points.has_memory)}, law,
                             points.n, points.m, points.d) for t in theta_KQ])


def points_law(points: Points) -> dict:
    return {"m_ref": points.m_ref, "n_ref": points.n_ref}


def fit_moe(n, d, loss, *, bootstrap: int = 0, seed: int = 0) -> dict:
    """Chinchilla's law of the MoE rows (N = active parameters), or {"skipped": reason}."""
    if len(loss) == 0:
        return {"skipped": "no MoE rows"}
    try:
        fit = fit_chinchilla(n, d, loss, bootstrap=bootstrap, seed=seed)
    except ValueError as error:
        return {"skipped": f"MoE rows: {error}"}
    return {"params": fit.params, "intervals": fit.intervals, "objective": fit.objective, "n_points": fit.n_points}


def fit_joint(n, m, d, loss, *, forms: list[str] | None = None, bootstrap: int = 0, seed: int = 0,
              level: float = 0.95, moe: dict | None = None, base=None) -> dict:
    """The joint.json record: every form's fit, held-out errors, the chosen form and why.

    `base` labels each point's base model for leave-one-base-out (default: its N)."""
    points = Points.checked(n, m, d, loss, base)
    names = forms or list(FORMS)
    if points.has_memory:
        seed_Q = dense_seed(points)
        fits = {name: fit_form(points, form(name), seed_Q, bootstrap=bootstrap, seed=seed, level=level)
                for name in names}
    else:  # every form is Chinchilla's law here: one fit, recorded under each form's name
        shared = fit_form(points, form(names[0]), np.zeros(5), bootstrap=bootstrap, seed=seed, level=level)
        fits = {name: {**shared, "form": name, "description": form(name).description,
                       "params": {**{k: shared["params"][k] for k in DENSE}, **dict.fromkeys(form(name).memory)}}
                for name in names}
    selection = choose({name: entry["held_out"] for name, entry in fits.items()})
    return {
        "kind": KIND, "version": VERSION, "fitter_version": FITTER_VERSION,
        "inputs": {"N": "active parameters", "M": "memory (value-table) parameters", "D": "training tokens",
                   "C": "6·N·D"},
        "n_points": int(points.loss.size), "n_memory_points": int((points.m > 0).sum()),
        "memory_sizes": sorted({float(v) for v in points.m}), "model_sizes": sorted({float(v) for v in points.n}),
        "m_ref": points.m_ref, "n_ref": points.n_ref, "huber_delta": 1e-3,
        "forms": fits, "selection": selection, "chosen": selection["chosen"],
        "moe": moe if moe is not None else {"skipped": "no MoE rows in the input"},
    }


def load_joint(path: str | Path) -> dict:
    """A joint.json record; ValueError (one line) for another file kind or version."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--law: {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--law: {path}: not JSON ({error})") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind != KIND:
        raise ValueError(f"--law: {path}: kind {kind!r}, expected {KIND!r} (write one with memlayers fit --law joint)")
    if data.get("version") != VERSION:
        raise ValueError(f"--law: {path}: version {data.get('version')!r}, this release reads version {VERSION}")
    return data
