"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, and the read-tiled weight gradient is right.

All run in child processes: the compile through `memlayers bench kernels --compile-only`, the weight
gradient under TRITON_INTERPRET=1, which must be set before triton is imported (see test_kernels_triton).
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit functions in the kernels package, read from the source."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


@pytest.mark.slow
def test_every_kernel_launch_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "bench", "kernels", "--compile-only"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("_")]
    kernels = {row[0] for row in rows}
    assert kernels == _jit_kernels() and len(kernels) == 3, kernels
    seen = {(row[0], row[1], row[-4]) for row in rows}
    for kernel in kernels:
        for dtype in ("fp32/fp32", "bf16/bf16", "bf16/fp32", "fp32/bf16", "fp16/fp16", "fp16/fp32", "fp64/fp64"):
            assert {(kernel, dtype, "sm_80"), (kernel, dtype, "sm_90")} <= seen, (kernel, dtype)
    read_tiles = {int(m) for m in re.findall(r"BLOCK_R=(\d+)", proc.stdout)}
    assert read_tiles == {16, 32, 64, 128}
    # the shared column is the compiled metadata, not a placeholder: reductions over reads use shared memory
    assert max(int(row[-3]) for row in rows) > 0
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary == f"{len(rows)} launches compiled for sm_80, sm_90, 0 problems", summary


WEIGHT_GRAD_CHILD = """
import torch
from memlayers.kernels import bag_triton
g = torch.Generator().manual_seed(0)
for t, r, v in ((3, 130, 7), (5, 3, 20)):
    values = torch.randn(50, v, generator=g)
    slots = torch.randint(0, 50, (t, r), generator=g)
    grad_y = torch.randn(t, v, generator=g)
    want = torch.einsum("trv,tv->tr", values[slots].double(), grad_y.double())
    got = bag_triton.weight_grad(values, slots, grad_y)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (t, r, v, (got - want).abs().max())
print("ok")
"""


def test_weight_grad_splits_reads_wider_than_one_tile():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", WEIGHT_GRAD_CHILD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_a_launch_over_the_shared_memory_limit_is_a_problem():
    child = ("from memlayers.kernels import aot\n"
             "aot.SHARED_LIMIT[90] = 512  # below what the widest weight-gradient tiles use\n"
             "compiled, problems = aot.compile_all(archs=(90,))\n"
             "over = [c for c in compiled if c.shared > 512]\n"
             "assert over and len(problems) == len(over), (len(over), problems[:3])\n"
             "assert all('over the 512 per block' in p for p in problems), problems[:3]\n"
             "print(len(problems))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and int(proc.stdout.split()[-1]) > 0, proc.stdout[-2000:] + proc.stderr[-2000:]
