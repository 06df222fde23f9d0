"""Seeded bootstrap over points (or runs): resampling counts and percentile intervals.

A replicate is a multiset of the n points drawn with replacement, kept as integer counts per point
so weighted objectives can refit many replicates at once. Replicates with fewer distinct points
than `min_distinct` (which could not identify the law) are redrawn, so every replicate is a
well-posed fit. Intervals are percentile intervals; infinite samples (an unbounded multiplier)
sort last and are reported as they fall.
"""

from __future__ import annotations

import numpy as np


def resample_counts(n_points: int, n_replicates: int, seed: int, *, groups: np.ndarray | None = None,
                    min_distinct: int = 1, max_tries: int = 100) -> np.ndarray:
    """Counts (n_replicates, n_points): how often each point appears in each replicate.

    `groups` (one label per point, e.g. distinct x values) makes `min_distinct` count labels,
    not points.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n_points) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    counts_BP = np.zeros((n_replicates, n_points))
    for b in range(n_replicates):
        for _ in range(max_tries):
            idx = rng.integers(0, n_points, n_points)
            if len(np.unique(labels[idx])) >= min_distinct:
                break
        counts_BP[b] = np.bincount(idx, minlength=n_points)
    return counts_BP


def percentile_interval(samples, level: float = 0.95) -> list[float]:
    """[low, high] percentile interval of 1-D samples (inf allowed, NaN dropped)."""
    arr = np.sort(np.asarray(samples, float)[~np.isnan(np.asarray(samples, float))])
    if arr.size == 0:
        return [float("nan"), float("nan")]
    tail = (1.0 - level) / 2.0
    lo = arr[int(np.floor(tail * (arr.size - 1)))]
    hi = arr[int(np.ceil((1.0 - tail) * (arr.size - 1)))]
    return [float(lo), float(hi)]


def intervals(samples: dict[str, np.ndarray], level: float = 0.95) -> dict[str, list[float]]:
    return {name: percentile_interval(values, level) for name, values in samples.items()}
