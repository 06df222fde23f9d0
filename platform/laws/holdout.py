"""Held-out error of a law: refit without some points, predict them, score the log residuals.

Two ways of holding out, both extrapolations (what a scaling law is used for):
- leave-one-base-out: for each distinct model size N, fit on the other sizes and predict that
  one's points (needs at least three sizes, so two remain to fit on; many sizes are grouped);
- leave-largest-compute-out: fit without the points of the largest compute C = 6·N·D (the top
  fifth, at least one point) and predict them.
The error of a criterion is the root mean square of log(observed) − log(predicted) over every
point it held out; a form's score is the mean of the criteria it could run. A refit that fails
(too few points left, a degenerate subset) leaves its criterion out with the reason.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LARGEST_COMPUTE_SHARE = 0.2
MAX_BASE_FOLDS = 8

Refit = Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]  # train mask -> predict(held-out mask)


def base_splits(n: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(N, held-out mask) for every distinct N, or [] with fewer than three sizes.

    With more than MAX_BASE_FOLDS sizes (a published sweep, not a study's few bases) the sizes
    are held out in MAX_BASE_FOLDS contiguous groups, labelled by their smallest N.
    """
    sizes = np.unique(n)
    if sizes.size < 3:
        return []
    groups = np.array_split(sizes, min(sizes.size, MAX_BASE_FOLDS))
    return [(float(group[0]), np.isin(n, group)) for group in groups]


def largest_compute_mask(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    compute = 6.0 * n * d
    count = max(1, int(np.floor(LARGEST_COMPUTE_SHARE * compute.size)))
    threshold = np.sort(compute)[-count]
    return compute >= threshold


def _log_rmse(observed: np.ndarray, predicted: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(observed) - np.log(predicted)
    return float(np.sqrt(np.mean(r ** 2))) if np.all(np.isfinite(r)) else float("inf")


def held_out_errors(refit: Refit, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict:
    """Both criteria for one law: `refit(train_mask)` returns its predictor for held-out masks."""
    out: dict = {}
    splits = base_splits(n)
    if not splits:
        out["leave_one_base_out"] = {"skipped": f"{np.unique(n).size} model sizes; the criterion needs 3"}
    else:
        predicted = np.empty_like(loss)
        per_base = {}
        try:
            for size, held in splits:
                predicted[held] = refit(~held)(held)
                per_base[f"{size:.6g}"] = _log_rmse(loss[held], predicted[held])
            out["leave_one_base_out"] = {"log_rmse": _log_rmse(loss, predicted), "per_base": per_base}
        except (ValueError, ArithmeticError) as error:
            out["leave_one_base_out"] = {"skipped": str(error)}
    held = largest_compute_mask(n, d)
    try:
        predicted = refit(~held)(held)
        out["leave_largest_compute_out"] = {"log_rmse": _log_rmse(loss[held], predicted),
                                            "held_out_points": int(held.sum())}
    except (ValueError, ArithmeticError) as error:
        out["leave_largest_compute_out"] = {"skipped": str(error)}
    scores = [v["log_rmse"] for v in out.values() if "log_rmse" in v]
    out["score"] = float(np.mean(scores)) if scores else float("inf")
    return out


def choose(errors: dict[str, dict]) -> dict:
    """The form with the lowest held-out score, the scores, and why, in words."""
    scores = {name: e["score"] for name, e in errors.items()}
    ranked = sorted(scores, key=lambda name: scores[name])
    best = ranked[0]
    if not np.isfinite(scores[best]):
        return {"chosen": best, "scores": scores,
                "why": "no held-out criterion could run (too few model sizes or points): first form kept"}
    others = ", ".join(f"{name} {scores[name]:.4g}" for name in ranked[1:])
    return {"chosen": best, "scores": scores,
            "why": f"lowest mean held-out log RMSE (leave-one-base-out and leave-largest-compute-out): "
                   f"{best} {scores[best]:.4g}" + (f" against {others}" if others else "")}
