"""Scaling-law fitting: Chinchilla's parametric law, compute and memory-size laws, recall curves,
compute-optimal frontiers and compute-equivalent multipliers, with bootstrap intervals.

Modules (import them directly; this package file stays light so `memlayers --help` is fast):
`chinchilla` L(N, D) = E + A/N^α + B/D^β · `power` L(x) = E + A·x^(−α) (compute and memory-size
laws) · `recall` logistic recall-vs-memory curve · `frontier` N_opt(C), D_opt(C) · `compare`
compute-equivalent multipliers · `bootstrap` resampling · `result` the LawFit record ·
`io` CSV/JSON export and `load_fit` · `study` fit_study (pure numpy/scipy:
no CLI and no MLflow here). The numerical core is `logfit` (log-space
Huber objective with analytic gradient) driven by `lbfgs` (L-BFGS over many starts at once).
"""

from importlib import import_module

_EXPORTS = {
    "LawFit": "result", "fit_chinchilla": "chinchilla", "fit_power_law": "power", "fit_recall": "recall",
    "compute_optimal": "frontier", "compare_family": "compare", "load_fit": "io", "save_fit": "io",
    "fit_study": "study",
}


def __getattr__(name: str):
    """Lazy re-exports: `from memlayers.platform.laws import fit_study` imports only what it needs."""
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
