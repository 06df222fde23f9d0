"""`memlayers bench NAME`: benchmarks that print numbers (never timed tests)."""

from __future__ import annotations

import argparse

from memlayers.platform.cli.main import run_commands

BENCHMARKS: dict[str, tuple[str, str]] = {
    "memory": ("memlayers.platform.bench.memory", "memory-layer step time and RSS vs slots, beside product-key-memory"),
    "kernels": ("memlayers.platform.bench.kernels", "embedding-bag kernel bandwidth (GPU) or interpreter check (CPU)"),
    "fit": ("memlayers.platform.bench.fit", "Chinchilla fit: analytic-gradient grid vs plain scipy"),
    "train": ("memlayers.platform.bench.train", "training-loop tokens/s for tiny dense and Memory+ models"),
    "study": ("memlayers.platform.bench.study",
              "a small study on local Ray: wall time, time in steps, start-up per cell"),
    "decode": ("memlayers.platform.bench.decode",
               "decoding tokens/s and ms/token, dense / MoE / PKM / Memory+ at equal FLOPs"),
    "baseline": ("memlayers.platform.bench.baseline",
                 "reference per-step losses of every family, compared with tests/assets"),
    "data": ("memlayers.platform.bench.data", "data preparation tokens/s (Ray Data at 1 and 2 CPUs vs one process), "
                                              "loader tokens/s, worker RSS at 1x and 8x the corpus"),
    "parallel": ("memlayers.platform.bench.parallel", "memory-parallel bytes/token and step time for P = 1, 2, 4"),
    "gpu": ("memlayers.platform.bench.gpu", "one JSON on a CUDA machine: kernels, bandwidth, bf16, FSDP x memory "
                                            "parallel, decode (one line without CUDA)"),
}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_commands([args.name, *args.rest], BENCHMARKS, "memlayers bench")
