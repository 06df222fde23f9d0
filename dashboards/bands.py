"""Fitted curves with pointwise interval bands, for drawing a law over its measured points.

A band is the pointwise 2.5–97.5 percentile of the curves of bootstrap refits (points resampled
with replacement, seeded), the same resampling the fitter uses for parameter intervals. Power laws
(compute, memory size) refit all replicates at once through `power.bootstrap_samples`; the recall
logistic refits replicate by replicate (fewer of them). When the points cannot identify a spread
(as many distinct x values as parameters: every replicate is the same fit), there is no band and
`Curve.band_note` says why.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from memlayers.platform.laws.power import bootstrap_samples
from memlayers.platform.laws.recall import fit_recall
from memlayers.platform.laws.result import LAW_MODULES, LawFit

POWER_REPLICATES = 200
RECALL_REPLICATES = 40
N_PARAMS = {"compute": 3, "memory": 3, "recall": 4}


@dataclass
class Curve:
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    band_note: str = ""


def grid(x_min: float, x_max: float, n: int = 120, pad: float = 1.25) -> np.ndarray:
    """Log-spaced x values covering [x_min / pad, x_max · pad]."""
    return np.geomspace(x_min / pad, x_max * pad, n)


def _law_fit(entry: dict):
    return LawFit.from_dict(entry)


def _power_samples(fit, x, y, n: int, seed: int) -> list[dict]:
    samples = bootstrap_samples(fit, x, y, n, seed)
    return [{name: float(values[b]) for name, values in samples.items()} for b in range(n)]


def _recall_samples(fit, x, y, n: int, seed: int) -> list[dict]:
    floor = fit.params["floor"] if fit.details.get("floor_fixed") else None
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = []
    for _ in range(n):
        idx = rng.integers(0, len(x), len(x))
        try:
            out.append(fit_recall(x[idx], y[idx], floor=floor).params)
        except ValueError:  # a replicate with too few distinct sizes cannot be fitted
            continue
    return out


def law_curve(entry: dict, x_points, y_points, x_grid: np.ndarray, *, seed: int = 0,
              replicates: int | None = None) -> Curve:
    """The law `entry` (a saved LawFit) on `x_grid`, with a bootstrap band over its points."""
    fit = _law_fit(entry)
    curve = Curve(x_grid, np.asarray(fit.predict(x_grid), float))
    x_points, y_points = np.asarray(x_points, float), np.asarray(y_points, float)
    distinct = len(np.unique(x_points))
    needed = N_PARAMS.get(fit.law, 3) - (1 if fit.details.get("floor_fixed") else 0)
    if distinct <= needed:
        curve.band_note = f"no interval band: {distinct} distinct x values for {needed} parameters"
        return curve
    if fit.law in ("compute", "memory"):
        params = _power_samples(fit, x_points, y_points, replicates or POWER_REPLICATES, seed)
    else:
        params = _recall_samples(fit, x_points, y_points, replicates or RECALL_REPLICATES, seed)
    if len(params) < 10:
        curve.band_note = "no interval band: too few bootstrap refits succeeded"
        return curve
    predict = importlib.import_module(LAW_MODULES[fit.law]).predict
    curves_BX = np.array([predict(p, x_grid) for p in params])
    curves_BX = curves_BX[np.all(np.isfinite(curves_BX), axis=1)]
    curve.low, curve.high = np.percentile(curves_BX, [2.5, 97.5], axis=0)
    return curve
