"""Held-out error of a law: refit without some points, predict them, score the log residuals.

Two ways of holding out, both extrapolations (what a scaling law is used for):
- leave-one-base-out: for each base model (by default each distinct N), fit on the others and
  predict its points (needs at least three bases, so two remain to fit on; many are grouped);
- leave-largest-compute-out: fit without the points of the largest compute C = 6·N·D (the top
  fifth, at least one point) and predict them.
The error of a criterion is the root mean square of log(observed) − log(predicted) over every
point it held out; a form's score is the mean of the criteria it could run. Every refit of a
law runs in one batch (the folds are 0/1 weights on the points, as bootstrap replicates are
counts); a batch that cannot run (too few points left, a degenerate subset) leaves the
criteria out with the reason.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LARGEST_COMPUTE_SHARE = 0.2
MAX_BASE_FOLDS = 8

Refit = Callable[[np.ndarray], np.ndarray]  # training masks (K, P) -> predictions (K, P)


def base_splits(base: np.ndarray, n: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(base label, held-out mask) for every base, or [] with fewer than three bases.

    A base is a label per point (a study's base model; by default the model size N itself, since a
    memory model's active N differs a little from its dense base's). With more than MAX_BASE_FOLDS
    bases (a published sweep, not a study's few) they are held out in MAX_BASE_FOLDS groups of
    neighbouring sizes, labelled by their smallest base.
    """
    labels = np.unique(base)
    if labels.size < 3:
        return []
    ordered = sorted(labels, key=lambda label: float(np.mean(n[base == label])))
    groups = np.array_split(np.array(ordered, dtype=object), min(len(ordered), MAX_BASE_FOLDS))
    return [(_label(group[0]), np.isin(base, list(group))) for group in groups]


def _label(value) -> str:
    return f"{value:.6g}" if isinstance(value, (float, np.floating)) else str(value)


def largest_compute_mask(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    compute = 6.0 * n * d
    count = max(1, int(np.floor(LARGEST_COMPUTE_SHARE * compute.size)))
    threshold = np.sort(compute)[-count]
    return compute >= threshold


def _log_rmse(observed: np.ndarray, predicted: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(observed) - np.log(predicted)
    return float(np.sqrt(np.mean(r ** 2))) if np.all(np.isfinite(r)) else float("inf")


def held_out_errors(refit: Refit, n: np.ndarray, d: np.ndarray, loss: np.ndarray,
                    base: np.ndarray | None = None) -> dict:
    """Both criteria for one law. `refit(train_KP)` fits the law once per row of training masks
    (all at once) and returns its predictions (K, P) at every point."""
    out: dict = {}
    base = n if base is None else np.asarray(base)
    splits = base_splits(base, n)
    largest = largest_compute_mask(n, d)
    held_KP = np.array([held for _, held in splits] + [largest])
    try:
        predicted_KP = refit(~held_KP)
    except (ValueError, ArithmeticError) as error:
        return {"leave_one_base_out": {"skipped": str(error)}, "leave_largest_compute_out": {"skipped": str(error)},
                "score": float("inf")}
    if not splits:
        out["leave_one_base_out"] = {"skipped": f"{np.unique(base).size} bases; the criterion needs 3"}
    else:
        predicted = np.empty_like(loss)
        per_base = {}
        for k, (label, held) in enumerate(splits):
            predicted[held] = predicted_KP[k, held]
            per_base[label] = _log_rmse(loss[held], predicted[held])
        out["leave_one_base_out"] = {"log_rmse": _log_rmse(loss, predicted), "per_base": per_base}
    out["leave_largest_compute_out"] = {"log_rmse": _log_rmse(loss[largest], predicted_KP[-1, largest]),
                                        "held_out_points": int(largest.sum())}
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
