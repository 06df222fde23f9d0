"""Named model shapes: tiny CPU bases, the paper's bases (134m ... 8b) and memory sizes.

`build_config(base, family, memory_slots=..., experts=...)` turns a base into a `ModelConfig`
of any family (for `peer`, `memory_slots` or `experts` is the number of experts). Shapes of the
paper family: 373m is dim 1024 / 24 layers / 16 heads (the
reference configs); 8b is the Llama-3-8B shape. Bases up to 1.3b use a 32,000-token
vocabulary, 8b Llama 3's 128,256. Names give the dense total parameter count, rounded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from memlayers.config_schema import ConfigError
from memlayers.models.config import MemoryConfig, ModelConfig, MoEConfig, PeerConfig
from memlayers.models.families import family_spec

BASES: dict[str, dict[str, Any]] = {
    # tiny CPU bases (vocab set by the tokenizer at run time)
    "femto": dict(dim=16, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64),
    "pico": dict(dim=24, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64),
    "nano": dict(dim=32, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64),
    "micro": dict(dim=48, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=64),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, max_seq_len=128),
    "small": dict(dim=128, n_layers=4, n_heads=4, vocab_size=4096, max_seq_len=256),
    # the paper's bases
    "134m": dict(dim=768, n_layers=12, n_heads=12, ffn_dim=2048, vocab_size=32000, max_seq_len=2048),
    "373m": dict(dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, vocab_size=32000, max_seq_len=2048),
    "720m": dict(dim=1536, n_layers=22, n_heads=16, ffn_dim=4096, vocab_size=32000, max_seq_len=2048),
    "1.3b": dict(dim=2048, n_layers=24, n_heads=16, ffn_dim=5504, vocab_size=32000, max_seq_len=2048),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
               max_seq_len=8192, rope_theta=500000.0),
}

# PEER per base: experts N = n^2, retrieval heads and experts per head. The paper bases use the
# PEER paper's 8 heads x top-16 (128 experts per token) and N growing with the base up to the
# 768^2 = 589,824 experts the Memory Layers paper compares with at 1.3b (1024^2 at 8b, the PEER
# paper's size); the CPU bases use 4 heads x top-8 over 32^2 or 64^2 experts.
PEER_DEFAULTS: dict[str, dict[str, int]] = {
    **{base: dict(experts=32 ** 2, heads=4, topk=8) for base in ("femto", "pico", "nano", "micro", "tiny")},
    "small": dict(experts=64 ** 2, heads=4, topk=8),
    "134m": dict(experts=256 ** 2, heads=8, topk=16),
    "373m": dict(experts=512 ** 2, heads=8, topk=16),
    "720m": dict(experts=512 ** 2, heads=8, topk=16),
    "1.3b": dict(experts=768 ** 2, heads=8, topk=16),
    "8b": dict(experts=1024 ** 2, heads=8, topk=16),
}

MEMORY_SIZES: dict[str, int] = {
    "1k": 32 ** 2, "4k": 64 ** 2, "16k": 128 ** 2, "64k": 256 ** 2, "256k": 512 ** 2, "576k": 768 ** 2, "1m": 1024 ** 2,
    "4m": 2048 ** 2, "16m": 4096 ** 2, "64m": 8192 ** 2,
}
PAPER_BASES = ("134m", "373m", "720m", "1.3b", "8b")
PAPER_MEMORY_SIZES = ("64k", "256k", "1m", "4m", "16m", "64m")


def memory_slots(size: int | str) -> int:
    """'1m' -> 1048576; an integer passes through."""
    if isinstance(size, str):
        if size not in MEMORY_SIZES:
            raise ConfigError("memory_slots", f"unknown memory size {size!r} "
                                              f"(expected one of {', '.join(MEMORY_SIZES)} or an integer)")
        return MEMORY_SIZES[size]
    return size


def memory_size_name(slots: int) -> str:
    names = {v: k for k, v in MEMORY_SIZES.items()}
    return names.get(slots, str(slots))


def build_config(base: str, family: str, *, memory_slots: int | str | None = None, experts: int | None = None,
                 memory: dict[str, Any] | None = None, moe: dict[str, Any] | None = None,
                 peer: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """A validated ModelConfig of `family` on base shape `base`.

    `memory` / `moe` / `peer` hold overrides of the family's section; for `peer`, `memory` is
    accepted in place of `peer` (a study keeps one options mapping per memory-like family).
    """
    if base not in BASES:
        raise ConfigError("base", f"unknown base {base!r} (expected one of {', '.join(BASES)})")
    spec = family_spec(family)
    fields = {**BASES[base], **overrides, "family": family}
    if spec.section == "memory":
        slots = globals()["memory_slots"](memory_slots if memory_slots is not None else "64k")
        options = {"heads": 4, "topk": 32, **(memory or {}), "slots": slots}
        options["topk"] = min(options["topk"], int(slots ** 0.5))
        fields["memory"] = MemoryConfig(**options)
    if spec.section == "moe":
        fields["moe"] = MoEConfig(**{"experts": experts or 8, **(moe or {})})
    if spec.section == "peer":
        fields["peer"] = _peer_config(base, memory_slots, experts, peer, memory)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in fields:
        if key not in known:
            raise ConfigError(f"model.{key}", f"unknown key (expected one of {', '.join(sorted(known))})")
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def _peer_config(base: str, size: int | str | None, experts: int | None, peer: dict[str, Any] | None,
                 memory: dict[str, Any] | None) -> PeerConfig:
    if peer and memory:
        raise ConfigError("peer", "give the PEER options in `peer` or in `memory`, not both")
    if size is not None and experts is not None and memory_slots(size) != experts:
        raise ConfigError("experts",
                          f"memory_slots={size!r} and experts={experts} disagree on the number of PEER experts")
    defaults = dict(PEER_DEFAULTS[base])
    count = memory_slots(size if size is not None else experts if experts is not None else defaults.pop("experts"))
    defaults.pop("experts", None)
    options = {**defaults, **(peer or memory or {}), "experts": count}
    options["topk"] = min(options["topk"], int(count ** 0.5))
    return PeerConfig(**options)
