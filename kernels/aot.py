"""Ahead-of-time compilation of every Triton kernel of memlayers for CUDA targets, on any machine.

Triton compiles a kernel for a named GPU architecture without a GPU (down to PTX and a cubin), which
catches what the interpreter cannot: ops or dtypes a target refuses, layouts, shared memory. The
launch space is every (kernel, dtype combination, tile) the wrappers of `memlayers.kernels.bag_triton`
can launch: the autotuner's tile configurations, and the weight gradient's read tiles (READS_BLOCKS);
pointers 16-byte aligned, as fresh torch tensors are. Each compiled kernel must fit its
architecture's shared memory per block.

Dtype combinations: the table (or output gradient) in fp32, bf16 or fp16 with its companion input
(bag weights, or the activations of a row dot) in the same dtype or in fp32, fp32 tables read by bf16
activations (autocast), and all-fp64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memlayers.kernels import bag_triton as bt

ARCHS = (80, 90)
# The opt-in shared memory per block of an A100 (sm_80) and an H100 (sm_90), in bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# (table or output gradient, companion input): the dtypes the callers of the kernels pass.
DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "bf16"),
               ("fp16", "fp16"), ("fp16", "fp32"), ("fp64", "fp64"))


class CompileFailure(RuntimeError):
    """One or more launches did not compile, or need more shared memory than their architecture has."""


@dataclass(frozen=True)
class Launch:
    kernel: str
    dtype: str                      # e.g. "bf16/fp32": table or gradient / companion input
    signature: tuple                # ((arg name, triton type), ...) of the runtime arguments
    constexprs: tuple               # ((name, value), ...)
    num_warps: int
    num_stages: int

    @property
    def tiles(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.constexprs if k.startswith("BLOCK"))


@dataclass(frozen=True)
class Compiled:
    launch: Launch
    arch: int
    shared: int
    num_warps: int
    num_stages: int

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch]


def _acc(kind: str) -> str:
    return "fp64" if kind == "fp64" else "fp32"


def _kernels() -> list[tuple[object, Callable[[str, str], dict], list[dict]]]:
    """(jit function, its pointer types for a dtype pair, its tile configurations) of each kernel."""
    if bt.INTERPRET:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (the interpreter has no targets)")

    def configs(tuned, extra: list[dict] | None = None) -> list[dict]:
        out = []
        for c in tuned.configs:
            for more in extra or [{}]:
                out.append({**c.kwargs, **more, "num_warps": c.num_warps, "num_stages": c.num_stages})
        return out

    reads = [{"BLOCK_R": r} for r in bt.READS_BLOCKS]
    return [
        (bt._forward_kernel, lambda d, c: {"values_ptr": d, "slots_ptr": "i64", "weights_ptr": c, "out_ptr": d},
         configs(bt._forward)),
        (bt._value_grad_kernel, lambda d, c: {"grad_ptr": d, "token_ptr": "i64", "weight_ptr": c,
                                              "start_ptr": "i64", "out_ptr": _acc(d)},
         configs(bt._value_grad)),
        (bt._weight_grad_kernel, lambda d, c: {"values_ptr": d, "slots_ptr": "i64", "grad_ptr": c,
                                               "out_ptr": _acc(d)},
         configs(bt._weight_grad, reads)),
    ]


def launches() -> Iterator[Launch]:
    """Every launch the kernels' wrappers can make (see the module docstring)."""
    for fn, pointers, tiles in _kernels():
        for table, companion in DTYPE_PAIRS:
            types = {name: "*" + kind for name, kind in pointers(table, companion).items()}
            scalars = [a for a in fn.arg_names if a not in types and a not in ("ACC",) and not a.startswith("BLOCK")]
            signature = tuple(types.items()) + tuple((a, "i32") for a in scalars)
            acc = tl.float64 if table == "fp64" else tl.float32
            for tile in tiles:
                block = tuple((k, v) for k, v in tile.items() if k.startswith("BLOCK"))
                yield Launch(fn.__name__, f"{table}/{companion}", signature, (("ACC", acc),) + block,
                             tile["num_warps"], tile["num_stages"])


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one launch for sm_`arch` down to a cubin; CompileFailure naming it when Triton refuses."""
    fn = {f.__name__: f for f, _, _ in _kernels()}[launch.kernel]
    signature = dict(launch.signature) | {name: "constexpr" for name, _ in launch.constexprs}
    # fresh torch allocations are 16-byte aligned: the specialisation a real launch compiles
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in launch.signature if t.startswith("*")}
    source = ASTSource(fn, signature, dict(launch.constexprs), aligned)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # Triton raises its own compilation errors and plain RuntimeErrors alike
        raise CompileFailure(f"{launch.kernel} {launch.dtype} {launch.tiles} sm_{arch}: {exc}") from exc
    meta = kernel.metadata
    return Compiled(launch, arch, meta.shared, meta.num_warps, meta.num_stages)


def compile_all(archs: tuple[int, ...] = ARCHS) -> tuple[list[Compiled], list[str]]:
    """Every launch for every architecture -> (compiled, problems: each launch that failed or does not fit)."""
    compiled, problems = [], []
    for launch in launches():
        for arch in archs:
            try:
                done = compile_launch(launch, arch)
            except CompileFailure as exc:
                problems.append(str(exc).splitlines()[0])
                continue
            compiled.append(done)
            if not done.fits:
                problems.append(f"{launch.kernel} {launch.dtype} {launch.tiles} sm_{arch}: "
                                f"{done.shared} bytes of shared memory, over the {SHARED_LIMIT[arch]} per block")
    return compiled, problems


def table(compiled: list[Compiled]) -> str:
    """The compiled launches as aligned text: kernel, dtype, tiles, arch, shared bytes, warps, stages."""
    rows = [("kernel", "dtype", "tiles", "arch", "shared", "warps", "stages")]
    rows += [(c.launch.kernel, c.launch.dtype, c.launch.tiles, f"sm_{c.arch}", str(c.shared), str(c.num_warps),
              str(c.num_stages)) for c in compiled]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
