"""`memlayers bench train`: tokens/s of the training loop on this machine, dense beside Memory+.

Runs the in-process `RunLoop` (the same code a Ray Train worker runs, without Ray) on synthetic
facts for a tiny dense model and the same base with a Memory+ layer, at 1 thread, and prints
tokens/s of the optimizer steps after a warm-up (median of the timed windows), side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

MODELS = {
    "dense": {"family": "dense"},
    "memory_plus": {"family": "memory_plus", "memory_slots": "16k", "memory": {"heads": 4, "topk": 16, "n_layers": 1}},
    "pkm": {"family": "pkm", "memory_slots": "16k", "memory": {"heads": 4, "topk": 16}},
    "moe": {"family": "moe", "experts": 4},
}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="nano", help="base preset (default nano)")
    parser.add_argument("--families", default="dense,memory_plus", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per family")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def measure(family: str, args: argparse.Namespace, cache: Path) -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch
    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    torch.set_num_threads(args.threads)
    cfg = run_config_from_dict({
        "name": "bench", "model": {"base": args.base, **MODELS[family]},
        "data": {"source": "facts", "seq_len": args.seq_len, "facts": {"people": 500, "renderings": 10}},
        "train": {"steps": args.steps + 5, "batch_size": args.batch_size},
    })
    loop = RunLoop(cfg, prepare_data(cfg.data, cache))
    for _ in range(5):
        loop.train_step()
    windows = []
    for _ in range(args.steps // 5):
        start = time.perf_counter()
        for _ in range(5):
            loop.train_step()
        windows.append(5 * loop.plan.tokens_per_step / (time.perf_counter() - start))
    return {"family": family, "base": args.base, "tokens_per_s": statistics.median(windows),
            "train_flops_per_token": loop.plan.accounting.train_flops_per_token,
            "total_params": loop.plan.accounting.total_params, "threads": args.threads}


def run(args: argparse.Namespace) -> int:
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in MODELS]
    if unknown:
        print(f"memlayers bench train: --families: unknown {unknown} (expected {', '.join(MODELS)})")
        return 2
    with tempfile.TemporaryDirectory() as cache:
        rows = [measure(f, args, Path(cache)) for f in families]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"training loop on CPU, base {args.base}, batch {args.batch_size}x{args.seq_len}, {args.threads} thread(s)")
    print(f"{'family':>12}  {'params':>9}  {'FLOPs/token':>11}  {'tokens/s':>9}  {'vs dense':>8}")
    dense = next((r["tokens_per_s"] for r in rows if r["family"] == "dense"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / dense:.2f}x" if dense else "-"
        print(f"{r['family']:>12}  {r['total_params']:>9,}  {r['train_flops_per_token']:>11,}  {r['tokens_per_s']:>9,.0f}  {ratio:>8}")
    return 0
