"""The registry of model families: the one place that lists them and says what each one takes.

Every other module (configs, presets, accounting, and the platform's study grids and CLI) reads
the names and properties from here:

- `FAMILIES`: every family name, in display order;
- `MEMORY_FAMILIES`: families sized by a number of table rows (memory slots or PEER experts),
  which a study grid sweeps as its memory sizes (`ModelConfig.memory_size` reads it back);
- `MEMORY_PARALLEL_FAMILIES`: families whose value tables can be split by columns across a
  memory-parallel group (`memlayers.kernels.sharded_values`);
- `family_spec(name)`: the `FamilySpec` of one family (a `ConfigError` naming `family` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from memlayers.config_schema import ConfigError


@dataclass(frozen=True)
class FamilySpec:
    name: str
    section: Optional[str]   # the ModelConfig section the family needs ("memory", "moe", "peer") or None
    sized_by: Optional[str]  # what a study sweeps: "slots" (table rows), "experts" (moe) or None
    memory_parallel: bool    # its value tables can be column-sharded across ranks
    summary: str


REGISTRY: dict[str, FamilySpec] = {spec.name: spec for spec in (
    FamilySpec("dense", None, None, False, "SwiGLU feed-forward in every layer"),
    FamilySpec("moe", "moe", "experts", False, "every feed-forward a mixture of SwiGLU experts"),
    FamilySpec("pkm", "memory", "slots", True, "product-key memory replacing chosen FFNs, own values per layer"),
    FamilySpec("memory_plus", "memory", "slots", True,
               "the paper's Memory+: qk-norm, swilu gate, several layers sharing one value table"),
    FamilySpec("peer", "peer", "slots", False,
               "PEER: product-key retrieval of single-neuron experts replacing chosen FFNs"),
)}

FAMILIES: tuple[str, ...] = tuple(REGISTRY)
MEMORY_FAMILIES: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.sized_by == "slots")
MEMORY_PARALLEL_FAMILIES: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.memory_parallel)
Family = Literal[FAMILIES]  # type: ignore[valid-type]  # Literal of the registry's names


def family_spec(name: str, path: str = "family") -> FamilySpec:
    if name not in REGISTRY:
        raise ConfigError(path, f"unknown family {name!r} (expected one of {', '.join(FAMILIES)})")
    return REGISTRY[name]
