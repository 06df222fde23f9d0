"""`memlayers bench parallel`: memory-parallel bytes per token and step time for P = 1, 2, 4 (CPU, gloo).

For each P, P gloo processes on 127.0.0.1 train a small Memory+ model whose value table is split
by columns over the P ranks (one memory-parallel group, no data parallelism): forward, backward,
value-grad sync and clipping, optimizer step — the trainer's step. Reported per P:

- bytes_per_token: bytes a rank sent in the value table's collectives per training token of that
  rank, counted by the autograd Functions from the tensors they issue (all the memory layers'
  calls of the shared table, forward and backward); DDP's all-reduce of the dense gradients is
  the same as in plain data parallelism and not included;
- step_ms: mean wall time of a step on the slowest rank after warm-up.

On a 2-core machine P = 4 oversubscribes the cores: read step times as relative, not absolute.
The text output also prints the column- and row-sharding volumes of
`memlayers.kernels.sharded_values.comm_bytes_per_token` for the same shapes.
"""

from __future__ import annotations

import argparse
import json
import time


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of {p, bytes_per_token, step_ms}")
    parser.add_argument("--p", type=int, nargs="+", default=[1, 2, 4], help="memory-parallel sizes (default 1 2 4)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per P (after 2 warm-up steps)")
    parser.add_argument("--dim", type=int, default=64, help="model dim = value dim V")
    parser.add_argument("--slots", type=int, default=128 ** 2, help="memory slots N (a square)")
    parser.add_argument("--heads", type=int, default=4, help="memory heads")
    parser.add_argument("--topk", type=int, default=8, help="rows read per head")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.set_defaults(func=run)


def model_config(options: dict):
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.models.config import (
        MemoryConfig,
        ModelConfig,
    )

    return ModelConfig(family="memory_plus", vocab_size=512, dim=options["dim"], n_layers=3, n_heads=4,
                       max_seq_len=options["seq_len"],
                       memory=MemoryConfig(slots=options["slots"], heads=options["heads"], topk=options["topk"]))


def _worker(rank: int, world: int, args: dict) -> dict:
    """One rank of a P = world run: timed training steps and the table's counted bytes."""
    # deferred: a bench target imports what it measures only when it runs
    import torch
    import torch.nn.functional as F

    from memlayers.models.transformer import Transformer
    from memlayers.platform.train.mesh import setup_parallel
    from memlayers.platform.train.optim import build_optimizers
    from memlayers.platform.train.run_config import TrainConfig

    torch.manual_seed(0)
    model = Transformer(model_config(args))
    plan = setup_parallel(model, world)
    ddp = plan.wrap_ddp(model) if world > 1 else model
    optimizers = build_optimizers(model, TrainConfig(steps=1_000_000, warmup=0.0), 1_000_000)
    gen = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 512, (args["batch"], args["seq_len"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    table = model.value_tables()[0]
    comm = getattr(table, "comm", None)
    times = []
    for step in range(2 + args["steps"]):
        if step == 2 and comm is not None:
            comm.reset()
        start = time.perf_counter()
        logits = ddp(inputs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        plan.sync_value_grads()
        torch.nn.utils.clip_grad_norm_(optimizers.dense_params, 1.0)
        plan.clip_value_grads_(1.0)
        optimizers.step()
        optimizers.zero_grad()
        times.append(time.perf_counter() - start)
    timed = times[2:]
    sent = comm.total if comm is not None else 0
    calls = comm.calls.get("gather_reads", 0) if comm is not None else 0
    return {"bytes": sent, "tokens": inputs.numel() * len(timed), "table_calls": calls,
            "step_ms": 1000 * sum(timed) / len(timed)}


def bench(p: int, args: dict) -> dict:
    """{p, bytes_per_token, step_ms} (+ per-call detail) for memory-parallel size p."""
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.cluster.local_launch import run_local

    ranks = run_local(_worker, p, args)
    per_token = ranks[0]["bytes"] / ranks[0]["tokens"]
    calls_per_step = ranks[0]["table_calls"] / args["steps"]
    return {"p": p, "bytes_per_token": per_token, "step_ms": max(r["step_ms"] for r in ranks),
            "calls_per_step": calls_per_step}


def run(args: argparse.Namespace) -> int:
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.kernels.sharded_values import comm_bytes_per_token

    options = {k: getattr(args, k) for k in ("steps", "dim", "slots", "heads", "topk", "batch", "seq_len")}
    rows = [bench(p, options) for p in args.p]
    if args.json:
        print(json.dumps([{k: r[k] for k in ("p", "bytes_per_token", "step_ms")} for r in rows]))
        return 0
    reads = args.heads * args.topk
    print(f"Memory+ dim={args.dim}, {args.slots} slots, K={reads} reads/token, 3 memory layers sharing one table, "
          f"{args.batch}x{args.seq_len} tokens per rank, gloo on CPU")
    print(f"{'P':>3} {'bytes/token':>12} {'per call':>10} {'column formula':>15} {'row formula':>12} {'step ms':>9}")
    for r in rows:
        calls = r["calls_per_step"] or 1
        column = comm_bytes_per_token(reads, args.dim, r["p"], layout="column")
        row = comm_bytes_per_token(reads, args.dim, r["p"], layout="row")
        print(f"{r['p']:>3} {r['bytes_per_token']:>12.0f} {r['bytes_per_token'] / calls:>10.0f} "
              f"{column:>15.0f} {row:>12.0f} {r['step_ms']:>9.1f}")
    return 0
