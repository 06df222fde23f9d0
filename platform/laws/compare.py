"""Compute-equivalent multipliers: how much reference (dense or MoE) compute a run's loss is worth.

With the reference family's compute law L_ref(C) = E + A·C^(−α), a run that reached loss L with
C FLOPs has multiplier
    k_run = C_ref(L) / C,   C_ref(L) = (A / (L − E))^(1/α):
"the reference needs k× this run's compute to reach its loss". When L ≤ E the reference never
gets there: the multiplier is unbounded (inf in Python, null in JSON, flagged `unbounded`).
A family's constant k is fitted over its runs by least squares in log loss,
    min over log k of Σ (log L_run − log L_ref(k·C_run))²,
bounded to k ∈ [1e-6, 1e6] (`at_bound` says when it hit a bound). Bootstrap replicates resample
the reference runs (refitting its law) and the family's runs; per-run intervals reflect the
reference law's uncertainty.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from memlayers.platform.laws import checks
from memlayers.platform.laws.bootstrap import percentile_interval
from memlayers.platform.laws.power import bootstrap_samples, fit_power_law
from memlayers.platform.laws.result import LawFit

LOG_K_BOUND = float(np.log(1e6))


def reference_compute(ref: dict[str, float], loss) -> np.ndarray:
    """C_ref(L): compute the reference law needs to reach each loss (inf where L ≤ E)."""
    loss = np.asarray(loss, float)
    gap = loss - ref["E"]
    with np.errstate(divide="ignore", over="ignore"):
        c = np.where(gap > 0, (ref["A"] / np.where(gap > 0, gap, 1.0)) ** (1.0 / ref["alpha"]), np.inf)
    return c


def multipliers(ref: dict[str, float], compute, loss) -> np.ndarray:
    """k_run = C_ref(L_run) / C_run for each run (inf when unbounded)."""
    if ref["alpha"] <= 0:
        raise ValueError("reference law: alpha must be > 0 to invert L(C)")
    return reference_compute(ref, loss) / np.asarray(compute, float)


def fit_constant(ref: dict[str, float], compute, loss) -> tuple[float, bool]:
    """(log k, at_bound): the constant with L_run ≈ L_ref(k·C_run) in the least-squares log sense."""
    log_c, log_l = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))

    def sse(log_k: float) -> float:
        pred = np.logaddexp(np.log(ref["A"]) - ref["alpha"] * (log_c + log_k), np.log(ref["E"]))
        return float(np.sum((log_l - pred) ** 2))

    res = minimize_scalar(sse, bounds=(-LOG_K_BOUND, LOG_K_BOUND), method="bounded", options={"xatol": 1e-6})
    log_k = float(res.x)
    return log_k, bool(LOG_K_BOUND - abs(log_k) < 1e-3)


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def compare_family(ref_compute, ref_loss, compute, loss, *, labels: list[str] | None = None,
                   reference: str = "dense", family: str = "model", ref_fit: LawFit | None = None,
                   bootstrap: int = 0, seed: int = 0, level: float = 0.95) -> dict:
    """Per-run multipliers and the fitted constant of `family` against `reference`."""
    c = checks.as_column(f"{family} compute", compute)
    losses = checks.as_column(f"{family} loss", loss)
    if checks.same_length(compute=c, loss=losses) == 0:
        raise ValueError(f"{family}: no runs with both compute and loss")
    ref_fit = ref_fit or fit_power_law(ref_compute, ref_loss, law="compute")
    ref = ref_fit.params
    per_run = multipliers(ref, c, losses)
    log_k, at_bound = fit_constant(ref, c, losses)
    labels = labels or [str(i) for i in range(len(c))]
    runs = [{"label": lab, "compute": float(ci), "loss": float(li), "multiplier": _finite_or_none(m),
             "unbounded": bool(not np.isfinite(m))} for lab, ci, li, m in zip(labels, c, losses, per_run)]
    out = {"reference": reference, "family": family, "reference_law": dict(ref), "k": float(np.exp(log_k)),
           "log10_k": log_k / np.log(10.0), "at_bound": at_bound, "n_runs": len(c), "runs": runs}
    if bootstrap > 0:
        ref_samples = bootstrap_samples(ref_fit, ref_compute, ref_loss, bootstrap, seed)
        rng = np.random.default_rng(seed + 1)
        k_B = np.empty(bootstrap)
        per_run_BR = np.empty((bootstrap, len(c)))
        for b in range(bootstrap):
            ref_b = {name: float(v[b]) for name, v in ref_samples.items()}
            idx = rng.integers(0, len(c), len(c))
            k_B[b] = np.exp(fit_constant(ref_b, c[idx], losses[idx])[0])
            per_run_BR[b] = multipliers(ref_b, c, losses) if ref_b["alpha"] > 0 else np.inf
        out["k_interval"] = percentile_interval(k_B, level)
        for r, run in enumerate(runs):
            run["interval"] = percentile_interval(per_run_BR[:, r], level)
        out["bootstrap"] = {"replicates": bootstrap, "seed": seed, "level": level,
                            "method": "percentile; resampling reference runs and family runs"}
    return out
