"""Triton kernels of the embedding bag: forward, value-gradient segment sum, fused weight gradient.

- `_forward_kernel`: a program owns BLOCK_T tokens x BLOCK_V value columns and loops over the R
  reads, accumulating weight * row in ACC (fp32; fp64 for fp64 tables); rows are loaded in their
  storage dtype (fp32/bf16/fp16) and cast to ACC before any arithmetic (in the interpreter bf16
  arrives as raw bits, so the cast must come first). Any V: columns are masked.
- `_value_grad_kernel`: a program owns one segment of the slot-sorted reads (one unique row,
  see `memlayers.kernels.segments`) x BLOCK_V columns and sums weight * grad_y[token] over the
  segment in sorted order: deterministic, no atomics (atomics on bf16 are not available).
- `_weight_grad_kernel`: a program owns BLOCK_T tokens x BLOCK_R reads (one of READS_BLOCKS, so the
  set of tiles it is launched with is finite and each compiles ahead of time, see
  `memlayers.kernels.aot`) and loops over V in BLOCK_V chunks, accumulating <grad_y[t], values[slot]>
  without materialising rows.

Tiles: on a GPU the kernels are autotuned over a few tile configurations (keyed on R and V);
under TRITON_INTERPRET=1 autotuning with several configs fails and every program instance costs
milliseconds, so one configuration is used there, with tiles as large as the tiny test shapes.
Row offsets are computed in int64 (N*V may exceed 2^31). The interpreter rounds fp32 -> bf16 by
truncation (a GPU rounds to nearest even), so bf16 outputs there may differ by one bf16 ulp.

Shape suffixes: see docs/shapes.md (R reads per token, L = T * R).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from memlayers.kernels.bag_torch import accumulate_dtype
from memlayers.kernels.segments import Segments

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The weight gradient's read tiles: wider R is split over the grid's second axis; narrower R is masked
# in a 16-wide tile, which keeps the set of tiles (and their ahead-of-time compiles) small.
READS_BLOCKS = (16, 32, 64, 128)


@triton.jit
def _forward_kernel(values_ptr, slots_ptr, weights_ptr, out_ptr, T, R, V,
                    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = t < T
    tv_ok = t_ok[:, None] & (v < V)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=ACC)
    for j in range(0, R):
        slot = tl.load(slots_ptr + t * R + j, mask=t_ok, other=0).to(tl.int64)
        w = tl.load(weights_ptr + t * R + j, mask=t_ok, other=0).to(ACC)
        row = tl.load(values_ptr + slot[:, None] * V + v[None, :], mask=tv_ok, other=0).to(ACC)
        acc += w[:, None] * row
    tl.store(out_ptr + t[:, None] * V + v[None, :], acc.to(out_ptr.dtype.element_ty), mask=tv_ok)


@triton.jit
def _value_grad_kernel(grad_ptr, token_ptr, weight_ptr, start_ptr, out_ptr, V,
                       ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    u = tl.program_id(0)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    lo = tl.load(start_ptr + u)
    hi = tl.load(start_ptr + u + 1)
    acc = tl.zeros((BLOCK_V,), dtype=ACC)
    for e in range(lo, hi):
        token = tl.load(token_ptr + e).to(tl.int64)
        w = tl.load(weight_ptr + e).to(ACC)
        g = tl.load(grad_ptr + token * V + v, mask=v_ok, other=0).to(ACC)
        acc += w * g
    tl.store(out_ptr + u.to(tl.int64) * V + v, acc, mask=v_ok)


@triton.jit
def _weight_grad_kernel(values_ptr, slots_ptr, grad_ptr, out_ptr, T, R, V,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = t < T
    tr_ok = t_ok[:, None] & (r < R)[None, :]
    slot = tl.load(slots_ptr + t[:, None] * R + r[None, :], mask=tr_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        v_ok = v < V
        g = tl.load(grad_ptr + t[:, None] * V + v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0).to(ACC)
        rows = tl.load(values_ptr + slot[:, :, None] * V + v[None, None, :],
                       mask=tr_ok[:, :, None] & v_ok[None, None, :], other=0).to(ACC)
        acc += tl.sum(rows * g[:, None, :], axis=2)
    tl.store(out_ptr + t[:, None] * R + r[None, :], acc, mask=tr_ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tuned(kernel, configs: list[dict], key: list[str]):
    """Autotuned over `configs` on a GPU; the bare kernel (tiles passed per launch) in the interpreter."""
    if INTERPRET:
        return kernel
    return triton.autotune([triton.Config(c, num_warps=4) for c in configs], key=key)(kernel)


_forward = _tuned(_forward_kernel, [{"BLOCK_T": t, "BLOCK_V": v} for t in (1, 4) for v in (64, 128)], ["R", "V"])
_value_grad = _tuned(_value_grad_kernel, [{"BLOCK_V": v} for v in (64, 128)], ["V"])
_weight_grad = _tuned(_weight_grad_kernel, [{"BLOCK_T": 1, "BLOCK_V": v} for v in (16, 32)], ["R", "V"])


def _tiles(**tiles: int) -> dict:
    """Interpreter tiles: as large as the (tiny) shapes, so few program instances run."""
    return tiles if INTERPRET else {}


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def forward(values_NV: torch.Tensor, slots_TR: torch.Tensor, weights_TR: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """-> (T, V) in the values' dtype; `out` (contiguous) receives it when given."""
    values_NV, slots_TR, weights_TR = values_NV.contiguous(), slots_TR.contiguous(), weights_TR.contiguous()
    (T, R), V = slots_TR.shape, values_NV.shape[1]
    y_TV = values_NV.new_empty(T, V) if out is None else out
    if T:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
        _forward[grid](values_NV, slots_TR, weights_TR, y_TV, T, R, V, ACC=_acc(values_NV.dtype),
                       **_tiles(BLOCK_T=_block(T, 16), BLOCK_V=_block(V, 64)))
    return y_TV


def value_grad_rows(grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, segs: Segments,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """-> (U, V) in the accumulation dtype, one program per (unique row, column block)."""
    U, V = segs.unique_U.numel(), grad_y_TV.shape[1]
    rows_UV = (torch.empty(U, V, dtype=accumulate_dtype(grad_y_TV.dtype), device=grad_y_TV.device)
               if out is None else out)
    weights_L = weights_TR.reshape(-1)[segs.read_L].contiguous()
    if U:
        grid = lambda meta: (U, triton.cdiv(V, meta["BLOCK_V"]))  # noqa: E731
        _value_grad[grid](grad_y_TV.contiguous(), segs.token_L, weights_L, segs.start_U1, rows_UV, V,
                          ACC=_acc(grad_y_TV.dtype), **_tiles(BLOCK_V=_block(V, 64)))
    return rows_UV


def weight_grad(values_NV: torch.Tensor, slots_TR: torch.Tensor, grad_y_TV: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """-> (T, R) in the accumulation dtype."""
    values_NV, slots_TR = values_NV.contiguous(), slots_TR.contiguous()
    (T, R), V = slots_TR.shape, values_NV.shape[1]
    grad_TR = torch.empty(T, R, dtype=accumulate_dtype(values_NV.dtype), device=slots_TR.device) if out is None else out
    if T:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(R, meta["BLOCK_R"]))  # noqa: E731
        _weight_grad[grid](values_NV, slots_TR, grad_y_TV.contiguous(), grad_TR, T, R, V,
                           ACC=_acc(values_NV.dtype), BLOCK_R=max(_block(R, READS_BLOCKS[-1]), READS_BLOCKS[0]),
                           **_tiles(BLOCK_T=_block(T, 16), BLOCK_V=_block(V, 64)))
    return grad_TR
