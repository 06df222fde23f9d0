"""`memlayers bench memory`: step time and peak RSS of one memory layer vs the number of slots.

One Memory+ layer (dim 512, 4 heads, top-32, key dim 256), input 4 x 256 tokens, 2 threads,
forward + backward + optimizer step, at each `--sizes` slot count, for:

- `memlayers`: `MemoryLayer` with row-sparse value gradients, the values in their own group with
  a row-sparse optimizer (`--optimizer row_adagrad` (default) or `lazy_adam`), AdamW for the rest;
- `lucidrains`: the peer `product_key_memory.PKM(dim=512, heads=4, num_keys=sqrt(S), topk=32,
  dim_head=128)` (the optional `bench` extra, product-key-memory==0.3.0) with torch Adam.

Both run in the same conditions: by default each child gets the CPU allocator settings of
`memlayers.kernels.allocator` (huge-page allocations for large tensors, freed memory kept for
reuse instead of being page-faulted in again every step); `--default-allocator` turns them off
for both.
Every (impl, size) row runs in its own child process (`python -m memlayers.platform.bench.memory
--child IMPL SLOTS`), so its peak RSS (`ru_maxrss` of the child) is its own. `step_ms` is the median
of the timed steps after the warm-up steps (robust to other load on a shared machine); `peak_rss_gb` is in GB (10^9 bytes). The table also shows the
CPU time of a step (both threads, median): on a machine shared with other work it moves much less
than the wall time. The table is
followed by the ratios: ours at the largest size / ours at the smallest, the peer / ours at the
largest size (time and RSS). `--json` prints a list of {impl, slots, step_ms, peak_rss_gb}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DIM, HEADS, TOPK, KEY_DIM, BATCH, SEQ, THREADS = 512, 4, 32, 256, 4, 256, 2
DEFAULT_SIZES = (16384, 262144, 1048576)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated slot counts (perfect squares)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--optimizer", choices=("row_adagrad", "lazy_adam"), default="row_adagrad",
                        help="value optimizer of the memlayers rows")
    parser.add_argument("--skip-peer", action="store_true", help="measure memlayers only")
    parser.add_argument("--default-allocator", action="store_true",
                        help="measure without the allocator settings of memlayers.kernels.allocator (both impls)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if int(s ** 0.5) ** 2 != s:
            print(f"--sizes: {s} is not a perfect square (product keys need n*n slots)", file=sys.stderr)
            return 2
    impls = ["memlayers"] + ([] if args.skip_peer else ["lucidrains"])
    rows = []
    if not args.json:
        print(f"memory layer dim {DIM}, {HEADS} heads, top-{TOPK}, key dim {KEY_DIM}; batch {BATCH}x{SEQ}; "
              f"{THREADS} threads; {args.warmup} warm-up + {args.steps} timed steps; "
              f"memlayers values: {args.optimizer}; allocator: {'default' if args.default_allocator else 'tuned'} (both impls)")
        print(f"{'impl':<11} {'slots':>9} {'ms/step':>9} {'peak RSS GB':>12} {'CPU ms/step':>12}")
    for slots in sizes:
        for impl in impls:
            row = _run_child(impl, slots, args)
            rows.append(row)
            if not args.json:
                shown = ("failed" if row["step_ms"] is None else
                         f"{row['step_ms']:9.1f} {row['peak_rss_gb']:12.2f} {row['cpu_ms']:12.1f}")
                print(f"{impl:<11} {slots:>9} {shown}", flush=True)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "cpu_ms"} for r in rows]))
    else:
        for line in _ratios(rows, sizes):
            print(line)
    return 0 if all(r["step_ms"] is not None for r in rows) else 1


def _run_child(impl: str, slots: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "memlayers.platform.bench.memory", "--child", impl, str(slots),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", args.optimizer]
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.kernels.allocator import HUGE_PAGES_ENV

    env = dict(os.environ) if args.default_allocator else dict(os.environ, **HUGE_PAGES_ENV)
    if args.default_allocator:
        cmd.append("--default-allocator")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{impl} at {slots} slots failed (exit {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return {"impl": impl, "slots": slots, "step_ms": None, "peak_rss_gb": None}
    return json.loads(lines[-1])


def _ratios(rows: list[dict], sizes: list[int]) -> list[str]:
    by = {(r["impl"], r["slots"]): r for r in rows if r["step_ms"] is not None}
    lo, hi = min(sizes), max(sizes)
    out = []
    ours_lo, ours_hi, peer_hi = by.get(("memlayers", lo)), by.get(("memlayers", hi)), by.get(("lucidrains", hi))
    if ours_lo and ours_hi and lo != hi:
        out.append(f"ours {hi} / ours {lo} slots: time x{ours_hi['step_ms'] / ours_lo['step_ms']:.2f}"
                   f" (target <= 2.0), RSS x{ours_hi['peak_rss_gb'] / ours_lo['peak_rss_gb']:.2f}")
    peer_lo = by.get(("lucidrains", lo))
    if peer_lo and peer_hi and lo != hi:
        out.append(f"lucidrains {hi} / lucidrains {lo} slots: time x{peer_hi['step_ms'] / peer_lo['step_ms']:.2f}")
    if ours_hi and peer_hi:
        out.append(f"lucidrains / ours at {hi} slots: time x{peer_hi['step_ms'] / ours_hi['step_ms']:.1f} "
                   f"(target >= 10), RSS x{peer_hi['peak_rss_gb'] / ours_hi['peak_rss_gb']:.2f} (target >= 2)")
    return out


# ---- the child: one (impl, slots) measurement in its own process ----

def _build(impl: str, slots: int, optimizer: str):
    """-> (module, [optimizers])."""
    # deferred: a bench target imports what it measures only when it runs
    import torch

    if impl == "memlayers":  # each implementation's own imports, only for the row being measured
        from memlayers.kernels.value_optim import make_value_optimizer
        from memlayers.models.config import MemoryConfig
        from memlayers.models.memory import MemoryLayer

        layer = MemoryLayer(DIM, MemoryConfig(slots=slots, heads=HEADS, topk=TOPK, key_dim=KEY_DIM))
        layer.init_weights(DIM ** -0.5, DIM ** -0.5)
        values = layer.table.weight
        rest = [p for p in layer.parameters() if p is not values]
        return layer, [make_value_optimizer(optimizer, [values], lr=1e-3),
                       torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95))]
    if impl == "lucidrains":
        from product_key_memory import PKM  # the bench extra: installed with `.[bench]`

        layer = PKM(dim=DIM, heads=HEADS, num_keys=int(slots ** 0.5), topk=TOPK, dim_head=128)
        return layer, [torch.optim.Adam(layer.parameters(), lr=1e-3)]
    raise ValueError(f"impl: must be 'memlayers' or 'lucidrains', got {impl!r}")


def measure(impl: str, slots: int, steps: int, warmup: int, optimizer: str, tuned_allocator: bool = True) -> dict:
    """Time `warmup + steps` training steps of one layer in this process -> the JSON row."""
    # deferred: a bench target imports what it measures only when it runs
    import resource
    import time

    import torch

    if tuned_allocator:
        from memlayers.kernels.allocator import keep_freed_memory  # before the first allocation

        keep_freed_memory()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    layer, optimizers = _build(impl, slots, optimizer)
    x_BTD = torch.randn(BATCH, SEQ, DIM)
    times, cpu_times = [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        layer(x_BTD).float().pow(2).mean().backward()
        for opt in optimizers:
            opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"impl": impl, "slots": slots, "step_ms": round(1e3 * sorted(times)[len(times) // 2], 1),
            "peak_rss_gb": round(rss_gb, 3), "cpu_ms": round(1e3 * sorted(cpu_times)[len(cpu_times) // 2], 1)}


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_memory --child")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SLOTS"), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", default="row_adagrad")
    parser.add_argument("--default-allocator", action="store_true")
    args = parser.parse_args(argv)
    impl, slots = args.child[0], int(args.child[1])
    row = measure(impl, slots, args.steps, args.warmup, args.optimizer, not args.default_allocator)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
