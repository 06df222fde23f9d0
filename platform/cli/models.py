"""`memlayers models`: parameter and FLOP accounting of every preset x family x memory size."""

from __future__ import annotations

import argparse
import json

from memlayers.models.accounting import account
from memlayers.models.config import FAMILIES, MEMORY_FAMILIES
from memlayers.models.presets import BASES, PAPER_BASES, PAPER_MEMORY_SIZES, build_config, memory_slots


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--bases", default=",".join(PAPER_BASES),
                        help=f"comma-separated bases (known: {', '.join(BASES)})")
    parser.add_argument("--memory-sizes", default=",".join(PAPER_MEMORY_SIZES), help="comma-separated memory sizes")
    parser.add_argument("--experts", type=int, default=8, help="experts of the moe rows")
    parser.set_defaults(func=run)


def accounting_rows(bases: list[str], sizes: list[str], experts: int) -> list[dict]:
    """One row per base x family x memory size (memory sizes only for memory families)."""
    rows = []
    for base in bases:
        for family in FAMILIES:
            for size in (sizes if family in MEMORY_FAMILIES else [None]):
                cfg = build_config(base, family, memory_slots=size, experts=experts if family == "moe" else None)
                acc = account(cfg)
                rows.append({
                    "preset": base, "family": family,
                    "memory_slots": memory_slots(size) if size else 0,
                    "memory_size": size or "", "experts": experts if family == "moe" else 0,
                    **acc.as_dict(),
                })
    return rows


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def run(args: argparse.Namespace) -> int:
    bases = [b for b in args.bases.split(",") if b]
    sizes = [s for s in args.memory_sizes.split(",") if s]
    rows = accounting_rows(bases, sizes, args.experts)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = ("preset", "family", "memory", "total", "embedding", "mem values", "active", "train FLOPs/token")
    table = [header] + [
        (r["preset"], r["family"], r["memory_size"] or (f"{r['experts']}x" if r["experts"] else "-"),
         _human(r["total_params"]), _human(r["embedding_params"]), _human(r["memory_value_params"]),
         _human(r["active_params"]), _human(r["train_flops_per_token"]))
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    return 0
