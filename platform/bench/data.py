"""`memlayers bench data`: data preparation and loading on this machine, numbers side by side.

- Preparation tokens/s on one corpus (Shakespeare's plays plus generated documents from their
  words, in parquet files, a BPE tokenizer trained once beforehand so that every path times the
  encoding alone): the single-process path (`reference_streams`: one `datasets` reader, one
  encoder) and the Ray Data path (`prepare_set` on a local Ray of 1 and of 2 CPUs; Ray's start-up
  and a first, trivial dataset that starts Ray Data's actors are outside the timing, the tasks'
  worker processes start inside it). `prepare_speedup` = Ray Data at 2 CPUs over
  the single process.
- Loader tokens/s: a `TokenLoader` reading a prepared set's shards (local storage) at the
  quickstart's sequence length, beside what a quickstart training step consumes (the dense model
  of its smallest base, `bench train`'s loop, at its batch and sequence length).
- A worker's peak RSS (a fresh process opening the set and reading every shard once) with the
  corpus at 1x and at 8x: `rss_growth` = 8x over 1x.

`--json` prints one object with these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICKSTART = {"base": "femto", "batch_size": 16, "seq_len": 32}   # studies/quickstart.yaml's fastest step
RSS_PROBE = """
import json, resource, sys
from pathlib import Path
from memlayers.platform.data import DataConfig, TokenLoader
from memlayers.platform.data.prepare import open_prepared
cfg = DataConfig.from_dict(json.loads(sys.argv[1]))
data = open_prepared(cfg, sys.argv[2], None, Path(sys.argv[3]))
loader = TokenLoader(data.train_ids, cfg.seq_len, 512, seed=0)
steps = len(data.train_ids) // (512 * cfg.seq_len) + 1
for _ in range(steps):
    loader.next_batch()
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "steps": steps,
                  "peak_cache_bytes": data.train_ids.cache.peak_bytes}))
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=float, default=12.0, help="corpus size for the preparation timings (MB of text)")
    parser.add_argument("--rss-mb", type=float, default=6.0, help="the 1x corpus of the RSS probe (MB of text)")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def write_corpus(folder: Path, megabytes: float, files: int = 8) -> int:
    """Shakespeare's plays, then generated documents from their words, over `files` parquet files."""
    # deferred: a bench target imports what it measures only when it runs
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memlayers.platform.data.shakespeare import plays

    texts = [text for _, text in plays()]
    words = np.array(sorted(set(" ".join(texts).split())))
    rng = np.random.default_rng(0)
    texts, size = texts[:max(1, int(len(texts) * min(1.0, megabytes / 5.0)))], 0
    size = sum(len(t.encode()) for t in texts)
    while size < megabytes * 1e6:
        doc = " ".join(rng.choice(words, size=1500)) + "\n"
        texts.append(doc)
        size += len(doc.encode())
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        pq.write_table(pa.table({"text": texts[f::files]}), folder / f"part-{f}.parquet", row_group_size=32)
    return size


def _prepare_timed(cfg, root: Path, tokenizer, cpus: int) -> float:
    """Seconds `prepare_set` takes on a local Ray of `cpus` CPUs, with the tokenizer already stored."""
    # deferred: a bench target imports what it measures only when it runs
    import ray.data

    from memlayers.platform.cluster.session import ray_cluster
    from memlayers.platform.data.build import prepare_set
    from memlayers.platform.data.identity import fingerprint
    from memlayers.platform.data.shards import set_uri
    from memlayers.platform.data.stored_tokenizer import save_tokenizer

    save_tokenizer(tokenizer, set_uri(str(root), fingerprint(cfg)))
    with ray_cluster(None, num_cpus=cpus):
        # Ray Data's own actors start with a cluster's first dataset: a one-off, like Ray's start-up
        ray.data.range(cpus, override_num_blocks=cpus).map_batches(lambda batch: batch).take_all()
        started = time.perf_counter()
        prepare_set(cfg, str(root), out=lambda _: None)
        return time.perf_counter() - started


def measure_prepare(work: Path, megabytes: float, vocab: int) -> dict:
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.data import DataConfig
    from memlayers.platform.data.prepare import reference_streams

    text_bytes = write_corpus(work / "corpus", megabytes)
    cfg = DataConfig(source="parquet", path=str(work / "corpus"), tokenizer="bpe", vocab_size=vocab,
                     shard_tokens=400_000)
    started = time.perf_counter()
    tokenizer, train, val = reference_streams(cfg, work / "reference")
    fit_and_encode = time.perf_counter() - started
    tokens = len(train) + len(val)
    started = time.perf_counter()
    reference_streams(cfg, work / "reference-again", tokenizer=tokenizer)
    single = time.perf_counter() - started
    ray_s = {cpus: _prepare_timed(cfg, work / f"ray{cpus}", tokenizer, cpus) for cpus in (1, 2)}
    return {"text_bytes": text_bytes, "tokens": tokens, "tokenizer_fit_s": round(fit_and_encode - single, 2),
            "single_process_tokens_per_s": round(tokens / single), "single_process_s": round(single, 2),
            "ray_1cpu_tokens_per_s": round(tokens / ray_s[1]), "ray_1cpu_s": round(ray_s[1], 2),
            "ray_2cpu_tokens_per_s": round(tokens / ray_s[2]), "ray_2cpu_s": round(ray_s[2], 2),
            "prepare_speedup": round(single / ray_s[2], 3)}


def measure_loader(work: Path, vocab: int) -> dict:
    """The loader over the 2-CPU set's shards at the quickstart's shape, beside a quickstart step."""
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.bench.train import measure
    from memlayers.platform.data import DataConfig, TokenLoader
    from memlayers.platform.data.prepare import open_prepared

    cfg = DataConfig(source="parquet", path=str(work / "corpus"), tokenizer="bpe", vocab_size=vocab,
                     shard_tokens=400_000)
    data = open_prepared(cfg, str(work / "ray2"), None, work / "cache")
    loader = TokenLoader(data.train_ids, QUICKSTART["seq_len"], QUICKSTART["batch_size"], seed=0)
    steps = 3000
    started = time.perf_counter()
    for _ in range(steps):
        loader.next_batch()
    loader_rate = steps * QUICKSTART["batch_size"] * QUICKSTART["seq_len"] / (time.perf_counter() - started)
    args = argparse.Namespace(base=QUICKSTART["base"], steps=20, warmup=3, batch_size=QUICKSTART["batch_size"],
                              seq_len=QUICKSTART["seq_len"], threads=1)
    (row,) = measure(["dense"], ["auto"], args, work / "facts")
    return {"loader_tokens_per_s": round(loader_rate), "step_tokens_per_s": round(row["tokens_per_s"]),
            "loader_shards": len(data.train_ids.segments)}


def measure_rss(work: Path, megabytes: float) -> dict:
    """A fresh worker process's peak RSS reading every shard of a set of 1x and of 8x the corpus."""
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.platform.data import DataConfig
    from memlayers.platform.data.build import prepare_set

    out = {}
    for scale in (1, 8):
        folder = work / f"rss{scale}"
        write_corpus(folder / "corpus", megabytes * scale)
        cfg = DataConfig(source="parquet", path=str(folder / "corpus"), tokenizer="byte", seq_len=64,
                         shard_tokens=500_000)
        prepare_set(cfg, str(folder / "data"), out=lambda _: None)
        probe = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(cfg.to_dict()), str(folder / "data"),
                                str(folder / "cache")], capture_output=True, text=True, check=True)
        out[scale] = json.loads(probe.stdout.strip().splitlines()[-1])
    return {"rss_1x_mb": round(out[1]["rss_kb"] / 1024, 1), "rss_8x_mb": round(out[8]["rss_kb"] / 1024, 1),
            "rss_growth": round(out[8]["rss_kb"] / out[1]["rss_kb"], 3),
            "rss_corpus_1x_mb": megabytes, "rss_corpus_8x_mb": megabytes * 8}


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        result = {**measure_prepare(work, args.mb, args.vocab), **measure_loader(work, args.vocab),
                  **measure_rss(work, args.rss_mb)}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"corpus: {result['text_bytes'] / 1e6:.1f} MB of text in 8 parquet files, {result['tokens']:,} BPE tokens "
          f"(vocabulary {args.vocab}; fitted once in {result['tokenizer_fit_s']} s, outside the timings)")
    print(f"  {'preparation':<34} {'tokens/s':>12} {'seconds':>9}")
    for label, key in (("single process (today's path)", "single_process"), ("Ray Data, 1 CPU", "ray_1cpu"),
                       ("Ray Data, 2 CPUs", "ray_2cpu")):
        print(f"  {label:<34} {result[key + '_tokens_per_s']:>12,} {result[key + '_s']:>9}")
    print(f"  prepare_speedup (Ray Data 2 CPUs / single process): {result['prepare_speedup']:.2f}x")
    print(f"loader: {result['loader_tokens_per_s']:,} tokens/s from {result['loader_shards']} shards vs "
          f"{result['step_tokens_per_s']:,} tokens/s a quickstart step ({QUICKSTART['base']} dense, batch "
          f"{QUICKSTART['batch_size']} x {QUICKSTART['seq_len']}) consumes")
    print(f"worker peak RSS reading every shard: {result['rss_1x_mb']} MB at {result['rss_corpus_1x_mb']} MB of text, "
          f"{result['rss_8x_mb']} MB at {result['rss_corpus_8x_mb']} MB (rss_growth {result['rss_growth']:.3f})")
    return 0
