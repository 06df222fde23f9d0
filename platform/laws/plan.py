"""What to train for a budget: the compute-optimal (N, M, D) of a joint law under constraints.

Compute is C = 6·N·D with N the active parameters (the accounting's training FLOPs per token
are 3 × 2 per multiply-add of the parameters a token uses; a memory layer's reads are active,
its value table is not, and the sub-key scoring, ~√slots per token, is left out). A memory
therefore costs no compute: what bounds M is memory. Per GPU, every parameter needs
BYTES_PER_PARAM bytes in training (bf16 weights and gradients, fp32 master weights and Adam's
two moments), the dense part replicated on each GPU and the value tables sharded over the
GPUs (memory parallelism), within USABLE_FRACTION of the GPU's memory (the rest is left to
activations and workspace, which are not modelled):
    BYTES_PER_PARAM·(N + M / gpus) ≤ USABLE_FRACTION·gpu_memory,   and M ≤ --max-memory-params.
The optimum is found by a zooming grid search over log N and the share of the memory that fits
beside N (log scale), for the
fitted law and each bootstrap replicate at once (its intervals), beside the dense optimum
(M = 0, same constraint) and, when the law file has an MoE fit, the MoE optimum (its memory
use is not checked: the file records no expert count). `dense_compute` inverts the dense
frontier: the compute a compute-optimal dense model needs to reach a loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from memlayers.platform.laws.bootstrap import percentile_interval
from memlayers.platform.laws.frontier import frontier_constants
from memlayers.platform.laws.joint import predict as joint_predict
from memlayers.platform.laws.joint import replicate_params
from memlayers.platform.laws.joint_forms import DENSE, dense_loss

BYTES_PER_PARAM = 16
USABLE_FRACTION = 0.8
GRID = 48           # points per axis of each zoom step
ZOOMS = 8           # each keeps ±2 cells around the best: the box shrinks 12x per step
MIN_TOKENS = 1e3
MIN_PARAMS = 1e3
MEMORY_DECADES = 8  # M is searched from 10^-8 of its upper bound up (M = 0 is the dense optimum)
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2 ** 10, "MIB": 2 ** 20,
          "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_bytes(text: str, field: str = "--gpu-memory") -> float:
    """'80GB' (1e9), '80GiB' (2^30), '8e10' (bytes) -> bytes; ValueError naming `field`."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if unit.endswith("G") or unit.endswith("T") or unit.endswith("M") or unit.endswith("K"):
        unit += "B"
    try:
        value = float(match.group(1)) * _UNITS[unit] if match else float("nan")
    except (KeyError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{field}: expected a positive size such as 80GB or 80GiB, got {text!r}")
    return value


@dataclass(frozen=True)
class Constraints:
    gpu_memory: float = 80e9
    gpus: int = 1
    max_memory_params: float | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"--gpus: must be >= 1, got {self.gpus}")
        if self.max_memory_params is not None and self.max_memory_params < 0:
            raise ValueError(f"--max-memory-params: must be >= 0, got {self.max_memory_params}")

    @property
    def capacity_params(self) -> float:
        """Parameters one GPU holds: BYTES_PER_PARAM·(N + M/gpus) may not exceed this times BYTES_PER_PARAM."""
        return USABLE_FRACTION * self.gpu_memory / BYTES_PER_PARAM

    def bytes_per_gpu(self, n, m) -> np.ndarray:
        return BYTES_PER_PARAM * (np.asarray(n, float) + np.asarray(m, float) / self.gpus)

    def as_dict(self) -> dict:
        return {"gpu_memory_bytes": self.gpu_memory, "gpus": self.gpus, "max_memory_params": self.max_memory_params,
                "bytes_per_param": BYTES_PER_PARAM, "usable_fraction": USABLE_FRACTION}


def _zoom(loss_fn, compute: float, box: np.ndarray, to_nm) -> tuple[np.ndarray, np.ndarray]:
    """Minimise loss_fn(N, M, D) over a box of search variables for R parameter sets.

    box (R, V, 2): per set and variable (V = 1 or 2), [low, high]; `to_nm(x, y)` maps the variables
    (y = None for one) to (N, M), infeasible points to N = NaN. Returns the best (R, V), its loss (R,).
    """
    n_sets, n_vars = box.shape[:2]
    lo, hi = box[..., 0].copy(), box[..., 1].copy()
    axes = np.linspace(0.0, 1.0, GRID)
    rows = np.arange(n_sets)
    for _ in range(ZOOMS):
        x = lo[:, 0, None, None] + (hi - lo)[:, 0, None, None] * axes[None, :, None]
        y = (lo[:, 1, None, None] + (hi - lo)[:, 1, None, None] * axes[None, None, :]) if n_vars == 2 else None
        n, m = to_nm(x, y)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss = loss_fn(n, m, compute / (6.0 * n))
        loss = np.where(np.isfinite(loss), loss, np.inf)
        flat = loss.reshape(n_sets, -1).argmin(axis=1)
        i, j = np.unravel_index(flat, loss.shape[1:])
        best = np.stack([x[rows, i, 0]] + ([y[rows, 0, j]] if n_vars == 2 else []), axis=1)
        best_loss = loss.reshape(n_sets, -1)[rows, flat]
        step = (hi - lo) / (GRID - 1)
        lo, hi = np.maximum(best - 2 * step, box[..., 0]), np.minimum(best + 2 * step, box[..., 1])
    return best, best_loss


def _search(loss_fn, compute: float, constraints: Constraints, n_sets: int, memory: bool,
            check_memory: bool = True) -> dict[str, np.ndarray]:
    """Best (N, M, D, loss) per parameter set: with a memory (M > 0) or dense (M = 0).

    The variables are log N and log u, M = u·M_avail(N) with M_avail the most memory that fits
    beside N: the feasible set is then a box, so an optimum on the memory constraint (u = 1) lies
    on an edge of every zoom's grid rather than between its points.
    """
    n_hi = min(compute / (6.0 * MIN_TOKENS), constraints.capacity_params if check_memory else np.inf)
    if n_hi <= MIN_PARAMS:
        raise ValueError(f"--compute: {compute:.3g} FLOPs leave no model of at least {MIN_PARAMS:.0f} parameters "
                         f"and {MIN_TOKENS:.0f} tokens within the memory given")
    rows = [[np.log(MIN_PARAMS), np.log(n_hi)]] + ([[-MEMORY_DECADES * np.log(10.0), 0.0]] if memory else [])

    def m_avail(n):
        room = constraints.gpus * np.maximum(constraints.capacity_params - n, 0.0)
        limit = constraints.max_memory_params
        return room if limit is None else np.minimum(room, limit)

    def to_nm(x, y):
        n = np.exp(x)
        return n, (np.exp(y) * m_avail(n) if y is not None else np.zeros_like(n))

    best, loss = _zoom(loss_fn, compute, np.broadcast_to(np.array(rows), (n_sets, len(rows), 2)).copy(), to_nm)
    n, m = to_nm(best[:, 0], best[:, 1] if memory else None)
    return {"n": n, "m": m, "d": compute / (6.0 * n), "loss": loss}


def dense_compute(params: dict, loss) -> np.ndarray:
    """C a compute-optimal dense model (the law at M = 0) needs to reach `loss` (inf at or below E)."""
    k = frontier_constants(params)
    s = params["alpha"] * params["beta"] / (params["alpha"] + params["beta"])
    scale = params["A"] * k["G"] ** -params["alpha"] + params["B"] * k["G"] ** params["beta"]
    gap = np.asarray(loss, float) - params["E"]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return np.where(gap > 0, 6.0 * (scale / np.where(gap > 0, gap, 1.0)) ** (1.0 / s), np.inf)


def multiplier(params: dict, loss, compute) -> np.ndarray:
    """Dense-equivalent compute over the compute spent: how much a memory's loss is worth."""
    return dense_compute(params, loss) / np.asarray(compute, float)


def _param_sets(law: dict, entry: dict, with_replicates: bool) -> tuple[dict, int]:
    """The fitted parameters and (optionally) the replicates', as arrays (R, 1, 1); R sets."""
    reps = replicate_params(entry) if with_replicates else {}
    count = 1 + (len(next(iter(reps.values()))) if reps else 0)
    sets = {k: None if v is None else np.r_[v, reps.get(k, np.full(count - 1, v))][:, None, None]
            for k, v in entry["params"].items()}
    return sets, count


def _summary(found: dict[str, np.ndarray], constraints: Constraints, level: float, check_memory: bool = True) -> dict:
    out = {k: float(v[0]) for k, v in found.items()}
    out["compute"] = 6.0 * out["n"] * out["d"]
    if check_memory:
        out["bytes_per_gpu"] = float(constraints.bytes_per_gpu(out["n"], out["m"]))
        binding = []
        if out["bytes_per_gpu"] >= 0.999 * BYTES_PER_PARAM * constraints.capacity_params:
            binding.append("gpu_memory")
        if constraints.max_memory_params is not None and out["m"] >= 0.999 * constraints.max_memory_params > 0:
            binding.append("max_memory_params")
        out["binding"] = binding
    if len(found["n"]) > 1:
        out["intervals"] = {k: percentile_interval(v[1:], level) for k, v in found.items()}
    return out


def extrapolation(law: dict, point: dict) -> list[str]:
    """Where a plan leaves the sizes the law was fitted on (its prediction is then an extrapolation)."""
    notes = []
    for key, label, sizes in (("n", "N", law.get("model_sizes")), ("m", "M", law.get("memory_sizes"))):
        fitted = [s for s in sizes or [] if s > 0]
        if fitted and point[key] > 0 and not min(fitted) <= point[key] <= max(fitted):
            notes.append(f"{label} = {point[key]:.3g} is outside the fitted {min(fitted):.3g} .. {max(fitted):.3g}")
    return notes


def optimum(law: dict, compute: float, constraints: Constraints, *, form: str | None = None,
            intervals: bool = True, level: float = 0.95) -> dict:
    """The plan at one budget: memory optimum (with intervals), dense optimum, MoE optimum."""
    if not np.isfinite(compute) or compute <= 0:
        raise ValueError(f"--compute: must be a positive number of FLOPs, got {compute!r}")
    name = form or law["chosen"]
    entry = law["forms"][name]
    params, count = _param_sets(law, entry, intervals)
    has_memory = all(v is not None for v in params.values())
    dense_fn = lambda n, m, d: dense_loss({k: params[k] for k in DENSE}, n, d)  # noqa: E731
    dense = _search(dense_fn, compute, constraints, count, memory=False)
    out: dict = {"compute": compute, "form": name, "constraints": constraints.as_dict(),
                 "dense": _summary(dense, constraints, level)}
    if has_memory:
        mem_fn = lambda n, m, d: joint_predict({**entry, "params": params}, law, n, m, d)  # noqa: E731
        best = _search(mem_fn, compute, constraints, count, memory=True)
        # where no memory helps, the dense optimum (M = 0) is the plan
        use_dense = dense["loss"] <= best["loss"]
        best = {k: np.where(use_dense, dense[k], best[k]) for k in best}
        out["optimum"] = _summary(best, constraints, level)
        dense_params = {k: entry["params"][k] for k in DENSE}
        out["optimum"]["multiplier"] = float(multiplier(dense_params, out["optimum"]["loss"], compute))
        out["optimum"]["extrapolation"] = extrapolation(law, out["optimum"])
    else:
        out["optimum"] = {**out["dense"], "note": "the law has no memory fit: the dense optimum"}
    moe = law.get("moe") or {}
    if "params" in moe:
        moe_params = {k: np.array([moe["params"][k]])[:, None, None] for k in DENSE}
        found = _search(lambda n, m, d: dense_loss(moe_params, n, d), compute, constraints, 1, memory=False,
                        check_memory=False)
        out["moe"] = {**_summary(found, constraints, level, check_memory=False),
                      "note": "N = active parameters; memory use not checked (the law file has no expert count)"}
    else:
        out["moe"] = {"skipped": moe.get("skipped", "the law file has no MoE fit")}
    return out


def frontier(law: dict, compute: float, constraints: Constraints, *, form: str | None = None,
             points: int = 9, decades: float = 2.0) -> list[dict]:
    """Point estimates of the plan over budgets from compute/10^decades to compute·10^decades."""
    rows = []
    for c in np.geomspace(compute / 10 ** decades, compute * 10 ** decades, points):
        try:
            plan = optimum(law, float(c), constraints, form=form, intervals=False)
        except ValueError as error:
            rows.append({"compute": float(c), "skipped": str(error)})
            continue
        best = plan["optimum"]
        rows.append({"compute": float(c), "n": best["n"], "m": best["m"], "d": best["d"], "loss": best["loss"],
                     "dense_loss": plan["dense"]["loss"], "moe_loss": plan["moe"].get("loss"),
                     "multiplier": best.get("multiplier"), "binding": best.get("binding", [])})
    return rows
