"""`memlayers bench decode`: decoding speed of dense, MoE, PKM and Memory+ at equal training FLOPs.

Nano cells at about dense's FLOPs (dense; MoE 4 experts; PKM and Memory+ with one memory
layer of 4k slots, 2 heads, top-16), untrained, decode greedily with the key/value cache
(`models.generate`): a 32-token prompt, then `--new` tokens, at batch 1 and batch 16, on
`--threads` threads. It prints tokens/s (all rows) and ms per decoding step beside each model's
training FLOPs/token: at equal FLOPs, what a sparse model pays per token for its memory traffic
and top-k search. The prefill is timed apart from the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

MODELS = {
    "dense": {"family": "dense"},
    "moe": {"family": "moe", "experts": 4},
    "pkm": {"family": "pkm", "memory_slots": "4k", "memory": {"heads": 2, "topk": 16, "n_layers": 1}},
    "memory_plus": {"family": "memory_plus", "memory_slots": "4k", "memory": {"heads": 2, "topk": 16, "n_layers": 1}},
}
PROMPT = 32


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="nano", help="base preset (default nano)")
    parser.add_argument("--families", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    parser.add_argument("--new", type=int, default=64, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size of the untrained models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=run)


def measure(family: str, batch: int, args: argparse.Namespace) -> dict:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.models.accounting import account
    from memlayers.models.generate import generate
    from memlayers.models.transformer import Transformer
    from memlayers.platform.train.run_config import ModelSpec

    torch.set_num_threads(args.threads)
    spec = ModelSpec(base=args.base, **MODELS[family])
    cfg = spec.build(args.vocab, PROMPT + args.new)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompts = torch.randint(2, args.vocab, (batch, PROMPT)).tolist()
    generate(model, prompts, 4)  # warm-up
    totals, prefills = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate(model, prompts, 1)
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(model, prompts, args.new)
        totals.append(time.perf_counter() - start)
    prefill, total = statistics.median(prefills), statistics.median(totals)
    step = max(total - prefill, 1e-9) / max(args.new - 1, 1)
    acc = account(cfg, PROMPT + args.new)
    return {"family": family, "base": args.base, "batch": batch, "ms_per_token": 1000 * step,
            "tokens_per_s": batch / step, "prefill_ms": 1000 * prefill,
            "train_flops_per_token": acc.train_flops_per_token, "total_params": acc.total_params,
            "threads": args.threads}


def run(args: argparse.Namespace) -> int:
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in MODELS]
    if unknown:
        print(f"memlayers bench decode: --families: unknown {', '.join(unknown)} (expected {', '.join(MODELS)})")
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    rows = [measure(f, b, args) for f in families for b in batches]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    dense = {r["batch"]: r for r in rows if r["family"] == "dense"}
    print(f"decode, {args.base} base, {PROMPT}-token prompt + {args.new} new tokens, greedy with the KV cache, "
          f"{args.threads} thread(s)")
    print(f"{'family':<12} {'train FLOPs/tok':>15} {'batch':>5} {'tokens/s':>10} {'ms/token':>9} {'vs dense':>9} "
          f"{'prefill ms':>10}")
    for r in rows:
        ratio = dense[r["batch"]]["ms_per_token"] / r["ms_per_token"] if r["batch"] in dense else float("nan")
        print(f"{r['family']:<12} {r['train_flops_per_token']:>15.3g} {r['batch']:>5} {r['tokens_per_s']:>10.1f} "
              f"{r['ms_per_token']:>9.2f} {ratio:>8.2f}x {r['prefill_ms']:>10.1f}")
    return 0
