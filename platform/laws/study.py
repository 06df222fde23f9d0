"""Fit every law a study defines from its run rows (see `mlflow_runs.load_study_rows`).

- compute laws L(C) per family over `train_flops` and `val_loss` (and per memory size or expert
  count when a family has several), where there are at least three distinct compute values;
- memory-size laws per (base, family[, budget]) over `memory_slots` > 0: L(M) for `val_loss` and
  `qa_answer_nll`, the logistic recall curve for `qa_exact_match` (floor fixed to the dense
  baseline's recall at that base when fewer than four memory sizes leave it unidentified); the
  same for downstream scores (`eval/<task>/answer_nll` as L(M), `eval/<task>/exact_match` and
  `f1` as recall curves);
- compute-equivalent multipliers of every other family against dense and against MoE.

A law that cannot be fitted (too few runs, missing metrics) is recorded as {"skipped": reason}
and listed in "skipped"; fit_study never raises on a small study.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Callable

import numpy as np

from memlayers.platform.laws.compare import compare_family
from memlayers.platform.laws.power import fit_power_law
from memlayers.platform.laws.recall import fit_recall
from memlayers.platform.laws.result import FITTER_VERSION, LawFit
from memlayers.platform.tracking.conventions import EVAL_PREFIX

LOSS_METRICS = ("val_loss", "qa_answer_nll")
RECALL_METRIC = "qa_exact_match"
EVAL_LOSSES = ("answer_nll",)                   # eval/<task>/answer_nll: a power law like qa_answer_nll
EVAL_ACCURACIES = ("exact_match", "f1")         # eval/<task>/exact_match, f1: the recall curve


def _value(row: dict, key: str) -> float | None:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _with(rows: list[dict], *keys: str) -> list[dict]:
    return [r for r in rows if all(_value(r, k) is not None for k in keys)]


def _attempt(what: str, skipped: list[str], fn: Callable[..., dict], *args, **kwargs) -> dict:
    """fn(*args, **kwargs), or {"skipped": reason} (also appended to `skipped`) when it fails on
    its input (ValueError, numpy's LinAlgError) or numerically (ArithmeticError)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, ArithmeticError) as error:
        skipped.append(f"{what}: {error}")
        return {"skipped": str(error)}


def _fit_entry(fit: LawFit, rows: list[dict]) -> dict:
    fit.provenance = {"runs": [r.get("run_id") or r.get("cell") for r in rows]}
    return fit.to_dict()


def _size_label(row: dict) -> str | None:
    if int(row.get("memory_slots") or 0) > 0:
        return f"slots={int(row['memory_slots'])}"
    if int(row.get("experts") or 0) > 0:
        return f"experts={int(row['experts'])}"
    return None


def _compute_law(rows: list[dict], bootstrap: int, seed: int) -> dict:
    usable = _with(rows, "train_flops", "val_loss")
    flops = [_value(r, "train_flops") for r in usable]
    losses = [_value(r, "val_loss") for r in usable]
    return _fit_entry(fit_power_law(flops, losses, law="compute", bootstrap=bootstrap, seed=seed), usable)


def fit_compute_laws(rows: list[dict], skipped: list[str], bootstrap: int = 0, seed: int = 0) -> dict:
    by_family: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_family[str(row.get("family"))].append(row)
    out = {}
    for family, family_rows in sorted(by_family.items()):
        out[family] = _attempt(f"compute law {family}", skipped, _compute_law, family_rows, bootstrap, seed)
        variants: dict[str, list[dict]] = defaultdict(list)
        for row in family_rows:
            label = _size_label(row)
            if label:
                variants[label].append(row)
        if len(variants) > 1:
            for label, variant_rows in sorted(variants.items()):
                name = f"{family}[{label}]"
                out[name] = _attempt(f"compute law {name}", skipped, _compute_law, variant_rows, bootstrap, seed)
    return out


def eval_metrics(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The downstream scores in the rows: (answer-NLL keys, accuracy keys: exact match and F1)."""
    keys = sorted({k for r in rows for k in r if k.startswith(EVAL_PREFIX) and _value(r, k) is not None})
    return ([k for k in keys if k.rsplit("/", 1)[-1] in EVAL_LOSSES],
            [k for k in keys if k.rsplit("/", 1)[-1] in EVAL_ACCURACIES])


def _dense_recall(rows: list[dict], base, dense_family: str, metric: str = RECALL_METRIC) -> float | None:
    dense = [r for r in rows if str(r.get("family")) == dense_family and r.get("base") == base
             and int(r.get("memory_slots") or 0) == 0]
    values = [v for v in (_value(r, metric) for r in dense) if v is not None]
    return float(np.mean(values)) if values else None


def _memory_law(usable: list[dict], metric: str, bootstrap: int, seed: int) -> dict:
    slots = [r["memory_slots"] for r in usable]
    values = [_value(r, metric) for r in usable]
    return _fit_entry(fit_power_law(slots, values, law="memory", bootstrap=bootstrap, seed=seed), usable)


def _recall_law(usable: list[dict], floor: float | None, bootstrap: int, seed: int,
                metric: str = RECALL_METRIC) -> dict:
    slots = [r["memory_slots"] for r in usable]
    values = [_value(r, metric) for r in usable]
    return _fit_entry(fit_recall(slots, values, floor=floor, bootstrap=bootstrap, seed=seed), usable)


def fit_memory_laws(rows: list[dict], skipped: list[str], dense_family: str = "dense",
                    bootstrap: int = 0, seed: int = 0) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if int(row.get("memory_slots") or 0) > 0:
            key = f"{row.get('base')}/{row.get('family')}"
            if row.get("budget") not in (None, ""):
                key += f"@{row['budget']}"
            groups[key].append(row)
    out = {}
    eval_losses, eval_accuracies = eval_metrics(rows)
    for key, group in sorted(groups.items()):
        entry = {}
        for metric in (*LOSS_METRICS, *eval_losses):
            usable = _with(group, metric)
            if metric in eval_losses and not usable:
                continue  # a downstream score only where some cell of the group has it
            entry[metric] = _attempt(f"memory law {key} {metric}", skipped,
                                     _memory_law, usable, metric, bootstrap, seed)
        for metric in (RECALL_METRIC, *eval_accuracies):
            usable = _with(group, metric)
            if metric in eval_accuracies and not usable:
                continue
            sizes = len({r["memory_slots"] for r in usable})
            floor = None if sizes >= 4 else _dense_recall(rows, group[0].get("base"), dense_family, metric)
            entry[metric] = _attempt(f"memory law {key} {metric}", skipped,
                                     _recall_law, usable, floor, bootstrap, seed, metric)
        out[key] = entry
    return out


def _points(rows: list[dict]) -> tuple[list[float], list[float], list[str]]:
    usable = _with(rows, "train_flops", "val_loss")
    return ([_value(r, "train_flops") for r in usable], [_value(r, "val_loss") for r in usable],
            [str(r.get("run_id") or r.get("cell")) for r in usable])


def fit_multipliers(rows: list[dict], reference: str, compute_laws: dict, skipped: list[str],
                    bootstrap: int = 0, seed: int = 0) -> dict:
    ref_entry = compute_laws.get(reference)
    if ref_entry is None or "skipped" in ref_entry:
        reason = f"no {reference} compute law" + (f" ({ref_entry['skipped']})" if ref_entry else " (no runs)")
        skipped.append(f"multipliers vs {reference}: {reason}")
        return {"skipped": reason}
    ref_fit = LawFit.from_dict(ref_entry)
    ref_c, ref_l, _ = _points([r for r in rows if str(r.get("family")) == reference])
    out = {}
    for family in sorted({str(r.get("family")) for r in rows} - {reference}):
        c, losses, labels = _points([r for r in rows if str(r.get("family")) == family])
        out[family] = _attempt(f"multipliers {family} vs {reference}", skipped, compare_family,
                               ref_c, ref_l, c, losses, labels=labels, reference=reference, family=family,
                               ref_fit=ref_fit, bootstrap=bootstrap, seed=seed)
    return out


def rows_sha256(rows: list[dict]) -> str:
    """A digest of the rows (sorted keys, sorted by run), naming exactly what was fitted."""
    ordered = sorted(rows, key=lambda r: str(r.get("run_id") or r.get("cell")))
    return hashlib.sha256(json.dumps(ordered, sort_keys=True, default=str).encode()).hexdigest()


def fit_study(rows: list[dict], *, dense_family: str = "dense", moe_family: str = "moe",
              bootstrap: int = 0, seed: int = 0) -> dict:
    """All of a study's laws as one dict of plain data (skipped laws carry their reason).

    Unbounded multipliers are float("inf"); `io.dumps` writes them as null.
    """
    skipped: list[str] = []
    families: dict[str, int] = defaultdict(int)
    for row in rows:
        families[str(row.get("family"))] += 1
    compute_laws = fit_compute_laws(rows, skipped, bootstrap, seed)
    return {
        "law": "study",
        "fitter_version": FITTER_VERSION,
        "n_runs": len(rows),
        "families": dict(families),
        "input_sha256": rows_sha256(rows),
        "bootstrap": {"replicates": bootstrap, "seed": seed},
        "compute_laws": compute_laws,
        "memory_laws": fit_memory_laws(rows, skipped, dense_family, bootstrap, seed),
        "multipliers": {
            f"vs_{dense_family}": fit_multipliers(rows, dense_family, compute_laws, skipped, bootstrap, seed),
            f"vs_{moe_family}": fit_multipliers(rows, moe_family, compute_laws, skipped, bootstrap, seed),
        },
        "skipped": skipped,
    }
