"""`memlayers bench train`: tokens/s of the training loop on this machine, dense beside the memory families.

Runs the in-process `RunLoop` (the same code a Ray Train worker runs, without Ray) on synthetic
facts for a tiny dense model and the same base with a memory layer, at 1 thread. Every model is
built and warmed up first; then the timed steps go round-robin over the models (one step each
in turn), so a change of load on a shared machine hits every row alike. Each row reports the
median wall time of a step with its interquartile range, the median CPU time beside it, and
tokens/s from the median; "vs dense" divides medians measured in this one run.

`--cpu-ops auto,torch` times the memory families twice, with the C++ CPU ops and with the torch
path (`memlayers.kernels.cpu_ops`), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

MODELS = {
    "dense": {"family": "dense"},
    "memory_plus": {"family": "memory_plus", "memory_slots": "16k", "memory": {"heads": 4, "topk": 16, "n_layers": 1}},
    "pkm": {"family": "pkm", "memory_slots": "16k", "memory": {"heads": 4, "topk": 16}},
    "moe": {"family": "moe", "experts": 4},
}
CPU_OPS = ("auto", "torch")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="nano", help="base preset (default nano)")
    parser.add_argument("--families", default="dense,memory_plus", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row before timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-ops", default="auto",
                        help="comma-separated MEMLAYERS_CPU_OPS modes to time the memory families under (auto, torch)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def _loop(family: str, args: argparse.Namespace, cache: Path):
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    cfg = run_config_from_dict({
        "name": "bench", "model": {"base": args.base, **MODELS[family]},
        "data": {"source": "facts", "seq_len": args.seq_len, "facts": {"people": 500, "renderings": 10}},
        "train": {"steps": args.steps + args.warmup, "batch_size": args.batch_size},
    })
    return RunLoop(cfg, prepare_data(cfg.data, cache))


def measure(families: list[str], modes: list[str], args: argparse.Namespace, cache: Path) -> list[dict]:
    """Build every (family, cpu-ops mode) row, warm each up, then time the steps round-robin."""
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.kernels.cpu_ops import ENV
    from memlayers.platform.bench.timing import StepTimes

    torch.set_num_threads(args.threads)
    rows = []
    for family in families:
        for mode in (["-"] if family in ("dense", "moe") else modes):
            rows.append({"family": family, "cpu_ops": mode, "loop": _loop(family, args, cache), "times": StepTimes()})
    previous = os.environ.get(ENV)
    try:
        for phase in ("warmup", "timed"):
            for _ in range(args.warmup if phase == "warmup" else args.steps):
                for row in rows:
                    os.environ[ENV] = row["cpu_ops"] if row["cpu_ops"] != "-" else "auto"
                    if phase == "warmup":
                        row["loop"].train_step()
                    else:
                        row["times"].time(row["loop"].train_step)
    finally:
        os.environ.pop(ENV, None) if previous is None else os.environ.__setitem__(ENV, previous)
    out = []
    for row in rows:
        loop, stats = row["loop"], row["times"].summary()
        out.append({"family": row["family"], "cpu_ops": row["cpu_ops"], "base": args.base,
                    "tokens_per_s": round(loop.plan.tokens_per_step / (stats["step_ms"] / 1e3), 1), **stats,
                    "train_flops_per_token": loop.plan.accounting.train_flops_per_token,
                    "total_params": loop.plan.accounting.total_params, "threads": args.threads})
    return out


def run(args: argparse.Namespace) -> int:
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in MODELS]
    modes = [m for m in args.cpu_ops.split(",") if m]
    if unknown:
        print(f"memlayers bench train: --families: unknown {unknown} (expected {', '.join(MODELS)})")
        return 2
    if not modes or any(m not in CPU_OPS for m in modes):
        print(f"memlayers bench train: --cpu-ops: expected a comma-separated subset of {', '.join(CPU_OPS)}, "
              f"got {args.cpu_ops!r}")
        return 2
    with tempfile.TemporaryDirectory() as cache:
        rows = measure(families, modes, args, Path(cache))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"training loop on CPU, base {args.base}, batch {args.batch_size}x{args.seq_len}, {args.threads} thread(s); "
          f"{args.warmup} warm-up + {args.steps} timed steps per row, round-robin; medians (IQR)")
    print(f"{'family':>12} {'cpu ops':>7} {'params':>9} {'FLOPs/token':>11} {'ms/step (IQR)':>15} "
          f"{'CPU ms (IQR)':>15} {'tokens/s':>9} {'vs dense':>8}")
    dense = next((r for r in rows if r["family"] == "dense"), None)
    for r in rows:
        ratio = f"{dense['step_ms'] / r['step_ms']:.2f}x" if dense else "-"
        print(f"{r['family']:>12} {r['cpu_ops']:>7} {r['total_params']:>9,} {r['train_flops_per_token']:>11,} "
              f"{r['step_ms']:>7.1f} ({r['step_ms_iqr']:>5.1f}) {r['cpu_ms']:>7.1f} ({r['cpu_ms_iqr']:>5.1f}) "
              f"{r['tokens_per_s']:>9,.0f} {ratio:>8}")
    if dense:
        print("vs dense: ratio of the median step times (= tokens/s ratio at equal tokens per step); "
              "on CPU time: " + ", ".join(f"{r['family']}/{r['cpu_ops']} {dense['cpu_ms'] / r['cpu_ms']:.2f}x"
                                           for r in rows if r is not dense))
    return 0
