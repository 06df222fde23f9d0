"""The compute-optimal frontier of a Chinchilla fit: N_opt(C), D_opt(C) and the loss there.

Minimising E + A/N^α + B/D^β under C = 6·N·D gives
    N_opt = G·(C/6)^(β/(α+β)),   D_opt = G^(−1)·(C/6)^(α/(α+β)),   G = (α·A / (β·B))^(1/(α+β)).
"""

from __future__ import annotations

import numpy as np


def frontier_constants(params: dict[str, float]) -> dict[str, float]:
    """G and the exponents of N_opt and D_opt in C/6."""
    alpha, beta = params["alpha"], params["beta"]
    if alpha <= 0 or beta <= 0:
        return {"G": float("nan"), "n_exponent": float("nan"), "d_exponent": float("nan")}
    g = (alpha * params["A"] / (beta * params["B"])) ** (1.0 / (alpha + beta))
    return {"G": float(g), "n_exponent": beta / (alpha + beta), "d_exponent": alpha / (alpha + beta)}


def compute_optimal(params: dict[str, float], compute) -> dict[str, np.ndarray]:
    """N_opt, D_opt and L_opt for each compute budget C (FLOPs)."""
    c = np.asarray(compute, float)
    if np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise ValueError("compute: budgets must be positive and finite")
    k = frontier_constants(params)
    if not np.isfinite(k["G"]):
        raise ValueError("frontier: needs alpha > 0 and beta > 0")
    n_opt = k["G"] * (c / 6.0) ** k["n_exponent"]
    d_opt = (c / 6.0) / n_opt
    loss = params["E"] + params["A"] * n_opt ** -params["alpha"] + params["B"] * d_opt ** -params["beta"]
    return {"compute": c, "n_opt": n_opt, "d_opt": d_opt, "loss": loss}
