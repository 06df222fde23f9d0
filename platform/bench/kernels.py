"""`memlayers bench kernels`: embedding-bag kernel bandwidth on a GPU, or the interpreter check on CPU.

With CUDA: forward and backward (value-gradient rows + weight gradient) of the Triton kernels and
of `F.embedding_bag` (per-sample weights, sparse gradient) at one size, reported as GB/s of the
bytes each must move (rows read, outputs written); CUDA events, median of `--iters` runs.
Without a GPU: says so, and runs the Triton kernels under TRITON_INTERPRET=1 (in a child process,
since the flag must be set before triton is imported) at a tiny size against the torch
reference, printing the max relative error of each part for fp32, bf16 and fp64.
`--compile-only`: every kernel launch compiled ahead of time for sm_80 and sm_90 (`memlayers.kernels.aot`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

FP32_TOLERANCE = 1e-5


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slots", type=int, default=1 << 20, help="N rows in the table (GPU)")
    parser.add_argument("--dim", type=int, default=512, help="V, the value dim (GPU)")
    parser.add_argument("--tokens", type=int, default=4096, help="T tokens (GPU)")
    parser.add_argument("--reads", type=int, default=128, help="K rows read per token (GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every kernel launch for sm_80 and sm_90 ahead of time (no GPU needed) and print "
                             "kernel, dtype, arch, shared bytes, warps, stages")
    parser.add_argument("--interpret-child", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.interpret_child:
        return _interpreter_check()
    if args.compile_only:
        return _compile_only()
    # deferred: a bench target imports what it measures only when it runs
    import torch

    if not torch.cuda.is_available():
        print("no GPU: running the Triton kernels under TRITON_INTERPRET=1 at a tiny size instead")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "memlayers.platform.bench.kernels", "--interpret-child"]
        return subprocess.run(cmd, env=env).returncode
    return _gpu_bandwidth(args)


def _compile_only() -> int:
    # deferred: a bench target imports what it measures only when it runs
    from memlayers.kernels import aot

    compiled, problems = aot.compile_all()
    print(aot.table(compiled))
    for problem in problems:
        print(f"FAILED {problem}")
    print(f"{len(compiled)} launches compiled for {', '.join(f'sm_{a}' for a in aot.ARCHS)}, {len(problems)} problems")
    return 1 if problems else 0


def _interpreter_check() -> int:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    from memlayers.kernels import bag_triton
    from memlayers.kernels.check import (
        backend_errors,
        random_case,
    )

    shape = (64, 40, 8, 12)  # N, V, T, K: V not a power of two, duplicates in and across bags
    print(f"interpreter check, N={shape[0]} V={shape[1]} T={shape[2]} K={shape[3]}, outputs NaN-poisoned; "
          "max relative error vs the fp64 reference:")
    worst_fp32 = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        errors = backend_errors(bag_triton, random_case(*shape, dtype=dtype, seed=0))
        print(f"  {str(dtype).removeprefix('torch.'):<9} " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items()))
        if dtype == torch.float32:
            worst_fp32 = max(errors.values())
    ok = worst_fp32 < FP32_TOLERANCE
    print(f"fp32 max error {worst_fp32:.2e} ({'within' if ok else 'ABOVE'} {FP32_TOLERANCE:g})")
    return 0 if ok else 1


def _gpu_bandwidth(args: argparse.Namespace) -> int:
    # deferred: a bench target imports what it measures only when it runs
    import torch
    import torch.nn.functional as F

    from memlayers.kernels import bag_triton
    from memlayers.kernels.segments import segments_of

    dtype = getattr(torch, args.dtype)
    n, v, t, k = args.slots, args.dim, args.tokens, args.reads
    values_NV = torch.randn(n, v, device="cuda", dtype=dtype)
    slots_TK = torch.randint(0, n, (t, k), device="cuda")
    weights_TK = torch.softmax(torch.randn(t, k, device="cuda"), dim=-1)
    grad_y_TV = torch.randn(t, v, device="cuda", dtype=dtype)
    item = values_NV.element_size()
    rows_bytes = t * k * v * item

    def ours_backward():
        segs = segments_of(slots_TK, n)
        bag_triton.value_grad_rows(grad_y_TV, weights_TK, segs)
        bag_triton.weight_grad(values_NV, slots_TK, grad_y_TV)

    leaf = values_NV.detach().requires_grad_()
    w_leaf = weights_TK.to(dtype).requires_grad_()

    def torch_backward():
        y = F.embedding_bag(slots_TK, leaf, per_sample_weights=w_leaf, mode="sum", sparse=True)
        torch.autograd.grad(y, (leaf, w_leaf), grad_y_TV)

    cases = {
        "forward  triton": (lambda: bag_triton.forward(values_NV, slots_TK, weights_TK), rows_bytes + t * v * item),
        "forward  F.embedding_bag": (lambda: F.embedding_bag(slots_TK, values_NV,
                                                             per_sample_weights=weights_TK.to(dtype),
                                                             mode="sum"), rows_bytes + t * v * item),
        # backward: grad rows written (<= T*K rows) + rows read for the weight gradient
        "backward triton": (ours_backward, 2 * rows_bytes),
        "backward F.embedding_bag (+its forward)": (torch_backward, 3 * rows_bytes),
    }
    print(f"GPU {torch.cuda.get_device_name()}: N={n} V={v} T={t} K={k} {args.dtype}")
    for name, (fn, nbytes) in cases.items():
        ms = time_cuda(fn, args.iters)
        print(f"  {name:<42} {ms:8.3f} ms  {nbytes / ms / 1e6:8.1f} GB/s")
    return 0


def time_cuda(fn, iters: int) -> float:
    # deferred: a bench target imports what it measures only when it runs
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="memlayers bench kernels")
    register(_parser)
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
