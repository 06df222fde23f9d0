"""Input checks shared by every law: each failure is a ValueError that names the column and why."""

from __future__ import annotations

import numpy as np


def as_column(name: str, values, *, positive: bool = True) -> np.ndarray:
    """A 1-D float array without NaN/inf (and > 0 when `positive`), or ValueError naming `name`."""
    try:
        arr = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: values must be numbers ({error})") from None
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} value(s) are NaN or infinite (first at row {bad[0]})")
    if positive:
        bad = np.flatnonzero(arr <= 0)
        if bad.size:
            raise ValueError(f"{name}: {bad.size} value(s) are not positive (first at row {bad[0]}: {arr[bad[0]]!r})")
    return arr


def same_length(**columns: np.ndarray) -> int:
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    return next(iter(lengths.values()))


def enough_points(n_points: int, n_params: int, law: str) -> None:
    if n_points < n_params:
        raise ValueError(f"{law}: {n_points} point(s) for {n_params} parameters; need at least {n_params}")


def distinct_values(name: str, values: np.ndarray, minimum: int, law: str) -> None:
    n = len(np.unique(values))
    if n < minimum:
        raise ValueError(f"{law}: {name} takes {n} distinct value(s); the law needs at least {minimum}")


def in_unit_interval(name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero((values < 0) | (values > 1))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} value(s) outside [0, 1] (first at row {bad[0]}: {values[bad[0]]!r})")


def spans(name: str, values: np.ndarray, minimum_ratio: float, law: str) -> None:
    """A power law's exponent is only identified when its input spans a real range."""
    ratio = float(values.max() / values.min())
    if ratio < minimum_ratio:
        raise ValueError(f"{law}: {name} spans only {ratio:.2f}x ({values.min():.3g} to {values.max():.3g}); "
                         f"the law needs at least {minimum_ratio:g}x")
