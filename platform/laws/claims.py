"""A study's claims, checked against its runs seed by seed: what holds, by how much, how surely.

A claim compares cells of the same seed on one metric (lower is better for losses, higher for
recall). Two kinds:

- `pairwise`: every `subject` cell beats the `reference` cell of its seed: the reference at the
  same memory size when it has one (Memory+ vs PKM at equal size), else the one reference cell
  (Memory+ at every size vs dense at equal FLOPs). A seed's difference is the worst of its pairs.
- `trend`: along memory size, every `subject` cell beats the next smaller one (loss falls with
  memory). A seed's difference is the smallest of its steps.

Differences are signed so that > 0 means the claim's direction (>= 0 is enough with
`at_least`). A claim holds only when it holds in every seed that has all its cells; its effect is
the mean of the per-seed differences, with a seeded bootstrap interval of that mean over seeds.
Pure numpy: the rows are the study's run rows (`tracking/runs.py`), the specs plain dicts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional

import numpy as np

from memlayers.platform.laws.bootstrap import percentile_interval

LOWER_IS_BETTER = ("val_loss", "qa_answer_nll", "loss", "forgetting")
KINDS = ("pairwise", "trend")


def _matches(row: dict, selector: dict[str, Any]) -> bool:
    return all(row.get(key) == value for key, value in selector.items())


def _value(row: dict, metric: str) -> Optional[float]:
    value = row.get(metric)
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


def _by_seed(rows: list[dict], selector: dict[str, Any]) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("seed") is not None and _matches(row, selector):
            found[int(row["seed"])].append(row)
    return found


def _better(a: float, b: float, metric: str) -> float:
    """How much `a` beats `b` on `metric` (positive: better)."""
    return b - a if metric in LOWER_IS_BETTER else a - b


def _pairwise(subjects: list[dict], references: list[dict], metric: str) -> Optional[tuple[float, list[dict]]]:
    by_size = {r.get("memory_slots") or 0: r for r in references}
    pairs = []
    for subject in sorted(subjects, key=lambda r: r.get("memory_slots") or 0):
        size = subject.get("memory_slots") or 0
        reference = by_size.get(size) if len(references) > 1 else references[0]
        a, b = _value(subject, metric), _value(reference, metric) if reference else None
        if a is None or b is None:
            return None
        pairs.append({"memory_slots": size, "subject": a, "reference": b, "difference": _better(a, b, metric)})
    return (min(p["difference"] for p in pairs), pairs) if pairs else None


def _trend(subjects: list[dict], metric: str) -> Optional[tuple[float, list[dict]]]:
    ordered = sorted(subjects, key=lambda r: r.get("memory_slots") or 0)
    values = [_value(r, metric) for r in ordered]
    if len(ordered) < 2 or any(v is None for v in values):
        return None
    steps = [{"from_slots": lo.get("memory_slots"), "to_slots": hi.get("memory_slots"), "from": a, "to": b,
              "difference": _better(b, a, metric)}
             for lo, hi, a, b in zip(ordered, ordered[1:], values, values[1:])]
    return min(s["difference"] for s in steps), steps


def check_claim(rows: list[dict], spec: dict, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """One claim checked on `rows` -> {id, claim, holds, seeds, seeds_holding, effect, interval, ...}."""
    metric, kind = spec["metric"], spec["kind"]
    subjects = _by_seed(rows, spec["subject"])
    references = _by_seed(rows, spec.get("reference") or {}) if kind == "pairwise" else {}
    per_seed = {}
    for s in sorted(subjects):
        if kind == "pairwise":
            outcome = _pairwise(subjects[s], references[s], metric) if references.get(s) else None
        else:
            outcome = _trend(subjects[s], metric)
        if outcome is not None:
            per_seed[s] = outcome
    differences = np.array([d for d, _ in per_seed.values()])
    at_least = bool(spec.get("at_least", False))
    holding = [s for s, (d, _) in per_seed.items() if (d >= 0 if at_least else d > 0)]
    result = {
        "id": spec["id"], "claim": spec["claim"], "metric": metric, "kind": kind, "at_least": at_least,
        "holds": bool(per_seed) and len(holding) == len(per_seed),
        "seeds": sorted(per_seed), "seeds_holding": holding,
        "differences": {str(s): float(d) for s, (d, _) in per_seed.items()},
        "detail": {str(s): parts for s, (_, parts) in per_seed.items()},
        "effect": float(differences.mean()) if differences.size else None,
        "interval": None,
    }
    if differences.size >= 2 and bootstrap > 0:
        rng = np.random.default_rng(seed)
        means = rng.choice(differences, size=(bootstrap, differences.size), replace=True).mean(axis=1)
        result["interval"] = percentile_interval(means)
    if not per_seed:
        result["note"] = "no seed has every cell this claim compares"
    return result


def check_claims(rows: list[dict], specs: list[dict], *, bootstrap: int = 1000, seed: int = 0) -> list[dict]:
    return [check_claim(rows, spec, bootstrap=bootstrap, seed=seed) for spec in specs]


def claim_line(result: dict) -> str:
    """One line a reader checks at a glance: HOLDS / DOES NOT HOLD, the claim, effect and seeds."""
    verdict = "HOLDS" if result["holds"] else "DOES NOT HOLD"
    seeds = f"{len(result['seeds_holding'])}/{len(result['seeds'])} seeds"
    if result["effect"] is None:
        return f"{verdict}: {result['claim']} ({result.get('note', 'not measured')})"
    interval = result["interval"]
    spread = f", 95% [{interval[0]:+.3g}, {interval[1]:+.3g}]" if interval else ""
    return f"{verdict}: {result['claim']} ({result['metric']} margin {result['effect']:+.3g}{spread}; {seeds})"
