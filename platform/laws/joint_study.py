"""A study's run rows as joint-law points: dense and one memory family fitted together, MoE beside.

Per finished cell (see `tracking.runs.load_study_rows`): N = active parameters, D = training
FLOPs / (6·N) (the law's C = 6·N·D), M = total − active parameters for the memory family's
cells (the value tables less the rows a token reads) and 0 for the dense family's. Cells of
other families are left out, except MoE's (experts > 0), whose Chinchilla law is the MoE
optimum of `plan`. Rows without a validation loss, FLOPs or parameter counts are skipped. A
cell's base model (the `base` tag) labels its points for leave-one-base-out.
"""

from __future__ import annotations

import numpy as np

from memlayers.platform.laws.joint import fit_joint, fit_moe


def _number(row: dict, key: str) -> float | None:
    try:
        value = float(row.get(key))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _columns(rows: list[dict], memory: bool) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"N": [], "M": [], "D": [], "loss": [], "base": []}
    for row in rows:
        n, c, loss = _number(row, "active_params"), _number(row, "train_flops"), _number(row, "val_loss")
        total = _number(row, "total_params")
        if None in (n, c, loss) or (memory and total is None):
            continue
        out["N"].append(n)
        out["M"].append(max(total - n, 0.0) if memory else 0.0)
        out["D"].append(c / (6.0 * n))
        out["loss"].append(loss)
        out["base"].append(str(row.get("base") or n))
    return {k: np.array(v, object if k == "base" else float) for k, v in out.items()}


def fit_joint_rows(rows: list[dict], *, memory_family: str = "memory_plus", dense_family: str = "dense",
                   bootstrap: int = 0, seed: int = 0) -> dict:
    """The joint.json record of a study's rows (ValueError when they cannot identify the law)."""
    dense = [r for r in rows if str(r.get("family")) == dense_family and not int(r.get("memory_slots") or 0)]
    memory = [r for r in rows if str(r.get("family")) == memory_family and int(r.get("memory_slots") or 0) > 0]
    moe = [r for r in rows if int(r.get("experts") or 0) > 0]
    if not memory:
        raise ValueError(f"--family: no finished {memory_family!r} cells with a memory in the study")
    a, b, c = _columns(dense, False), _columns(memory, True), _columns(moe, False)
    record = fit_joint(*(np.r_[a[k], b[k]] for k in ("N", "M", "D", "loss")), bootstrap=bootstrap, seed=seed,
                       moe=fit_moe(c["N"], c["D"], c["loss"], bootstrap=bootstrap, seed=seed),
                       base=np.r_[a["base"], b["base"]])
    record["families"] = {"dense": dense_family, "memory": memory_family, "moe_rows": len(c["loss"])}
    return record
