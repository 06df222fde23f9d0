"""`memlayers bench memory`: step time and peak RSS of one memory layer vs the number of slots.

One Memory+ layer (dim 512, 4 heads, top-32, key dim 256), input 4 x 256 tokens, 2 threads,
forward + backward + optimizer step, at each `--sizes` slot count, for:

- `memlayers`: `MemoryLayer` with row-sparse value gradients, the values in their own group with
  a row-sparse optimizer (`--optimizer row_adagrad` (default) or `lazy_adam`), AdamW for the rest;
- `lucidrains`: the peer `product_key_memory.PKM(dim=512, heads=4, num_keys=sqrt(S), topk=32,
  dim_head=128)` (the optional `bench` extra, product-key-memory==0.3.0) with torch Adam.

`--cpu-ops auto,torch` adds a `memlayers-torch` row per size: ours with the torch path in place
of the C++ CPU ops (`memlayers.kernels.cpu_ops`), measured in the same run. The peer is skipped,
with a printed reason, above `--peer-max-slots` (default 1M): at 4M slots its dense value table,
gradient and two Adam moments alone need 4 x 4M x 512 x 4 B = 34 GB.

Both run in the same conditions: by default each child gets the CPU allocator settings of
`memlayers.kernels.allocator` (huge-page allocations for large tensors, freed memory kept for
reuse instead of being page-faulted in again every step); `--default-allocator` turns them off
for both.
Every (impl, size) row runs in its own child process (`python -m memlayers.platform.bench.memory
--child IMPL SLOTS`), so its peak RSS (`ru_maxrss` of the child) is its own. The whole sweep runs
`--rounds` times (default 3), sizes ascending in even rounds and descending in odd ones, so a
change of load over the minutes a sweep takes hits every row alike. `step_ms` is the median of
all rounds' timed steps (after each child's warm-up steps), with its interquartile range;
`peak_rss_gb` is the largest of the rounds, in GB (10^9 bytes). The table also shows the CPU time
of a step (both threads, median and IQR): on a machine shared with other work it moves much less
than the wall time. The table is followed by the ratios: ours at each size / ours at the
smallest, the peer / ours at the largest size where both ran (time and RSS), on wall and on CPU
time. Each ratio is taken within every round (medians of rows measured minutes apart, not hours)
and reported as the median over the rounds with their range. `--json` prints a list of {impl,
slots, step_ms, step_ms_iqr, peak_rss_gb, rounds}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

DIM, HEADS, TOPK, KEY_DIM, BATCH, SEQ, THREADS = 512, 4, 32, 256, 4, 256, 2
DEFAULT_SIZES = (16384, 262144, 1048576, 4194304)
PEER_MAX_SLOTS = 1048576
OURS = {"auto": "memlayers", "torch": "memlayers-torch"}  # our rows per MEMLAYERS_CPU_OPS mode


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated slot counts (perfect squares)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="sweeps over every row (ratios are taken within each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--optimizer", choices=("row_adagrad", "lazy_adam"), default="row_adagrad",
                        help="value optimizer of the memlayers rows")
    parser.add_argument("--skip-peer", action="store_true", help="measure memlayers only")
    parser.add_argument("--peer-max-slots", type=int, default=PEER_MAX_SLOTS,
                        help="largest size the peer runs at (default 1M: it needs ~34 GB at 4M)")
    parser.add_argument("--cpu-ops", default="auto",
                        help="comma-separated MEMLAYERS_CPU_OPS modes for our rows (auto, torch)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="measure without the allocator settings of memlayers.kernels.allocator (both impls)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if int(s ** 0.5) ** 2 != s:
            print(f"--sizes: {s} is not a perfect square (product keys need n*n slots)", file=sys.stderr)
            return 2
    modes = [m for m in args.cpu_ops.split(",") if m]
    if not modes or any(m not in ("auto", "torch") for m in modes):
        print(f"--cpu-ops: expected a comma-separated subset of auto, torch, got {args.cpu_ops!r}", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.steps < 1:
        print("--rounds and --steps: must be >= 1", file=sys.stderr)
        return 2
    impls = [OURS[m] for m in modes] + ([] if args.skip_peer else ["lucidrains"])
    if not args.json:
        print(f"memory layer dim {DIM}, {HEADS} heads, top-{TOPK}, key dim {KEY_DIM}; batch {BATCH}x{SEQ}; "
              f"{THREADS} threads; {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds; "
              f"memlayers values: {args.optimizer}; "
              f"allocator: {'default' if args.default_allocator else 'tuned'} (both impls)")
        for size in sizes:
            if not args.skip_peer and size > args.peer_max_slots:
                print(f"lucidrains at {size} slots: skipped, above --peer-max-slots {args.peer_max_slots} (its dense "
                      f"table, gradient and Adam moments need ~{16 * size * DIM / 1e9:.0f} GB)")
    plan = [(impl, size) for size in sizes for impl in impls if impl != "lucidrains" or size <= args.peer_max_slots]
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        rounds.append([_run_child(impl, size, args) for impl, size in (plan if r % 2 == 0 else plan[::-1])])
        if not args.json:
            done = [f"{row['impl']} {row['slots']} "
                    + ("failed" if row["step_ms"] is None else f"{row['step_ms']:.1f} ms")
                    for row in rounds[-1]]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(done), flush=True)
    rows = [_pooled([row for one in rounds for row in one if (row["impl"], row["slots"]) == key]) for key in plan]
    if args.json:
        print(json.dumps([{k: r[k] for k in ("impl", "slots", "step_ms", "step_ms_iqr", "peak_rss_gb", "rounds")}
                          for r in rows]))
    else:
        print(f"{'impl':<16} {'slots':>9} {'ms/step (IQR)':>18} {'CPU ms/step (IQR)':>18} {'peak RSS GB':>12}")
        for row in rows:
            shown = ("failed" if row["step_ms"] is None else
                     f"{row['step_ms']:9.1f} ({row['step_ms_iqr']:6.1f}) "
                     f"{row['cpu_ms']:9.1f} ({row['cpu_ms_iqr']:6.1f}) "
                     f"{row['peak_rss_gb']:12.2f}")
            print(f"{row['impl']:<16} {row['slots']:>9} {shown}")
        for line in _ratios(rounds, sizes):
            print(line)
    return 0 if all(r["step_ms"] is not None for r in rows) else 1


def _pooled(runs: list[dict]) -> dict:
    """One row from its rounds: medians and IQRs over all their timed steps, the largest peak RSS."""
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.bench.timing import StepTimes

    done = [r for r in runs if r["step_ms"] is not None]
    row = {"impl": runs[0]["impl"], "slots": runs[0]["slots"], "rounds": len(done), "step_ms": None,
           "step_ms_iqr": None, "cpu_ms": None, "cpu_ms_iqr": None, "peak_rss_gb": None}
    if len(done) < len(runs):  # a failed round fails the row
        return row
    pooled = StepTimes(wall=[t for r in done for t in r["wall_s"]], cpu=[t for r in done for t in r["cpu_s"]])
    return {**row, **pooled.summary(), "peak_rss_gb": max(r["peak_rss_gb"] for r in done)}


def _run_child(impl: str, slots: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "memlayers.platform.bench.memory", "--child", impl, str(slots),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--optimizer", args.optimizer]
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.kernels.allocator import HUGE_PAGES_ENV
    from memlayers.kernels.cpu_ops import ENV

    env = dict(os.environ) if args.default_allocator else dict(os.environ, **HUGE_PAGES_ENV)
    env[ENV] = "torch" if impl == OURS["torch"] else "auto"
    if args.default_allocator:
        cmd.append("--default-allocator")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{impl} at {slots} slots failed (exit {proc.returncode}): {' | '.join(tail)}", file=sys.stderr)
        return {"impl": impl, "slots": slots, "step_ms": None, "peak_rss_gb": None}
    return json.loads(lines[-1])


def _ratios(rounds: list[list[dict]], sizes: list[int]) -> list[str]:
    """Ratios of medians taken within each round (rows of one round ran minutes apart), reported as
    the median over the rounds [their range]: ours at each size / ours at the smallest, the peer vs
    ours at the largest size both ran at, and ours on the torch path vs ours with the C++ CPU ops."""
    by = [{(r["impl"], r["slots"]): r for r in one if r["step_ms"] is not None} for one in rounds]

    def ratio(a: tuple[str, int], b: tuple[str, int], key: str = "step_ms") -> str | None:
        values = [rnd[a][key] / rnd[b][key] for rnd in by
                  if a in rnd and b in rnd and rnd[a].get(key) and rnd[b].get(key)]
        if not values:
            return None
        spread = f" [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else ""
        return f"x{statistics.median(values):.2f}{spread}"

    def cpu(a: tuple[str, int], b: tuple[str, int]) -> str:
        found = ratio(a, b, "cpu_ms")
        return f", CPU {found}" if found else ""

    out = []
    lo = min(sizes)
    for hi in sorted(sizes):
        time = ratio(("memlayers", hi), ("memlayers", lo))
        if time and hi != lo:
            out.append(f"ours {hi} / ours {lo} slots: time {time} (target <= 2.0), "
                       f"RSS {ratio(('memlayers', hi), ('memlayers', lo), 'peak_rss_gb')}"
                       f"{cpu(('memlayers', hi), ('memlayers', lo))}")
    both = [size for size in sizes if any(("memlayers", size) in rnd and ("lucidrains", size) in rnd for rnd in by)]
    if both:
        hi = max(both)
        if hi != lo and ratio(("lucidrains", hi), ("lucidrains", lo)):
            out.append(f"lucidrains {hi} / lucidrains {lo} slots: time {ratio(('lucidrains', hi), ('lucidrains', lo))}")
        out.append(f"lucidrains / ours at {hi} slots: time {ratio(('lucidrains', hi), ('memlayers', hi))} "
                   "(target >= 10), "
                   f"RSS {ratio(('lucidrains', hi), ('memlayers', hi), 'peak_rss_gb')} (target >= 2)"
                   f"{cpu(('lucidrains', hi), ('memlayers', hi))}")
    for size in sizes:
        time = ratio((OURS["torch"], size), ("memlayers", size))
        if time:
            out.append(f"ours at {size} slots, torch path / C++ CPU ops: time {time}"
                       f"{cpu((OURS['torch'], size), ('memlayers', size))}")
    out.append("ratios: the median over the rounds of each round's ratio of medians [lowest, highest]")
    return out


# ---- the child: one (impl, slots) measurement in its own process ----

def _build(impl: str, slots: int, optimizer: str):
    """-> (module, [optimizers])."""
    # deferred: a bench target imports what it measures only when it runs
    import torch

    if impl in OURS.values():  # each implementation's own imports, only for the row being measured
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
    raise ValueError(f"impl: must be one of {', '.join(OURS.values())} or 'lucidrains', got {impl!r}")


def measure(impl: str, slots: int, steps: int, warmup: int, optimizer: str, tuned_allocator: bool = True) -> dict:
    """Time `warmup + steps` training steps of one layer in this process -> the JSON row."""
    # deferred: a bench target imports what it measures only when it runs
    import resource

    import torch

    from memlayers.platform.bench.timing import StepTimes

    if tuned_allocator:
        from memlayers.kernels.allocator import keep_freed_memory  # before the first allocation

        keep_freed_memory()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    layer, optimizers = _build(impl, slots, optimizer)
    x_BTD = torch.randn(BATCH, SEQ, DIM)

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        layer(x_BTD).float().pow(2).mean().backward()
        for opt in optimizers:
            opt.step()

    for _ in range(warmup):
        step()
    times = StepTimes()
    for _ in range(steps):
        times.time(step)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"impl": impl, "slots": slots, **times.summary(), "peak_rss_gb": round(rss_gb, 3),
            "wall_s": times.wall, "cpu_s": times.cpu}


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
