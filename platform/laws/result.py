"""LawFit: one fitted law as a plain record that serialises to JSON and predicts again.

`params` holds the law's parameters by their published names (chinchilla: A, B, E, alpha, beta;
compute: A, E, alpha; memory: A, E, gamma; recall: floor, ceiling, slope, log_m_mid). `inputs`
names the arguments of `predict` in order. Prediction is delegated to the law's module, looked up
by name, so a fit loaded from JSON predicts exactly as the fitter did.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field

import numpy as np

FITTER_VERSION = "1.0.0"

LAW_MODULES: dict[str, str] = {
    "chinchilla": "memlayers.platform.laws.chinchilla",
    "compute": "memlayers.platform.laws.power",
    "memory": "memlayers.platform.laws.power",
    "recall": "memlayers.platform.laws.recall",
}


@dataclass
class LawFit:
    law: str
    params: dict[str, float]
    objective: float
    n_points: int
    inputs: list[str]
    intervals: dict[str, list[float]] | None = None
    provenance: dict = field(default_factory=dict)
    fitter_version: str = FITTER_VERSION
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.law not in LAW_MODULES:
            raise ValueError(f"law: unknown law {self.law!r}; expected one of {sorted(LAW_MODULES)}")

    def predict(self, *args, **kwargs) -> np.ndarray:
        """Predicted target for inputs given in `inputs` order or by name (e.g. N=…, D=…)."""
        values = list(args)
        for name in self.inputs[len(values):]:
            if name not in kwargs:
                raise TypeError(f"predict: missing input {name!r} (inputs are {self.inputs})")
            values.append(kwargs.pop(name))
        if kwargs or len(values) != len(self.inputs):
            raise TypeError(f"predict: expected inputs {self.inputs}")
        module = importlib.import_module(LAW_MODULES[self.law])
        return module.predict(self.params, *(np.asarray(v, float) for v in values))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["intervals"] is None:
            del data["intervals"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LawFit":
        missing = [k for k in ("law", "params", "objective", "n_points", "inputs") if k not in data]
        if missing:
            raise ValueError(f"not a saved law fit: missing {missing}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def fit_warning(entry: dict) -> str | None:
    """The warning a saved fit (`LawFit.to_dict()`) carries, e.g. an exponent at its bound."""
    return (entry.get("details") or {}).get("warning")
