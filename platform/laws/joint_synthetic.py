"""Synthetic points of the joint law from known parameters: the fits' tests and `bench fit`.

A grid of 5 model sizes × 5 memory sizes (0 and four sizes) × 2 token budgets (50 points),
each D jittered by up to ±0.15 decades (seeded) so that N and D are not collinear, losses from
one form with multiplicative log-normal noise (0.5% by default). The memory sizes' geometric
mean is the fit's m_ref, so the true memory parameters are those of the fitted law.
"""

from __future__ import annotations

import numpy as np

from memlayers.platform.laws.joint_forms import form

MODEL_SIZES = np.geomspace(2e7, 1e9, 5)
MEMORY_SIZES = np.array([0.0, 1e7, 4e7, 1.6e8, 6.4e8])
TOKEN_BUDGETS = np.array([4e9, 4e10])
DENSE_TRUTH = {"A": 400.0, "B": 2000.0, "E": 1.8, "alpha": 0.34, "beta": 0.37}
TRUTH: dict[str, dict[str, float]] = {
    "additive": {**DENSE_TRUTH, "G": 0.3, "gamma": 0.5},
    "effective_params": {**DENSE_TRUTH, "kappa": 1.0, "gamma": 0.5},
    "interaction": {**DENSE_TRUTH, "delta": 0.3, "iota": 0.15},
}


def reference_sizes() -> tuple[float, float]:
    """(m_ref, n_ref) of the grid: the geometric means the fit will use."""
    positive = MEMORY_SIZES[MEMORY_SIZES > 0]
    n = np.repeat(MODEL_SIZES, len(MEMORY_SIZES) * len(TOKEN_BUDGETS))
    return float(np.exp(np.log(positive).mean())), float(np.exp(np.log(n).mean()))


def synthetic_points(form_name: str, seed: int, noise: float = 0.005,
                     params: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """{"N", "M", "D", "loss"} of the grid under `form_name` (its TRUTH unless `params`)."""
    rng = np.random.default_rng(seed)
    n, m, d = (a.ravel() for a in np.meshgrid(MODEL_SIZES, MEMORY_SIZES, TOKEN_BUDGETS, indexing="ij"))
    d = d * 10.0 ** rng.uniform(-0.15, 0.15, d.size)
    m_ref, n_ref = reference_sizes()
    clean = form(form_name).predict(params or TRUTH[form_name], n, m, d, m_ref, n_ref)
    return {"N": n, "M": m, "D": d, "loss": clean * np.exp(rng.normal(0.0, noise, clean.size))}
