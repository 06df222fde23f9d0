"""The memory value lookup: an embedding bag over a value table, with row-sparse gradients.

    y_TV[t] = sum_j weights_TR[t, j] * values_NV[slots_TR[t, j]]

This is the one op every memory layer calls. `embedding_bag` dispatches to an implementation
(a backend module with `forward`, `value_grad_rows` and `weight_grad`, and optionally
`value_grad`: the value gradient's rows straight from the reads, and `value_and_weight_grad`:
both gradients in one pass; each returns None where it does not apply)
and wraps it in one autograd function:

- grad of `weights_TR[t, j]` = <grad_y_TV[t], values_NV[slots_TR[t, j]]>;
- grad of `values_NV`: only the U unique rows read get a gradient,
  grad_UV[u] = sum over the reads (t, j) of row u of weights_TR[t, j] * grad_y_TV[t],
  computed by a deterministic sort/segment reduction (`memlayers.kernels.segments`; on CPU the
  C++ `value_grad` of `bag_cpu` sorts and sums in one pass, in the same order). With
  `sparse_grad=True` it is returned as a coalesced sparse COO tensor holding those U rows, so the
  parameter's `.grad` is sparse and no work or memory grows with N; with `sparse_grad=False` it is
  scattered into a dense (N, V) tensor (the paper-faithful mode).

`row_dot` is the same lookup read the other way round (PEER's down projection):

    h_TR[t, j] = <x_TV[t], values_NV[slots_TR[t, j]]>

It is the adjoint of the bag in its weights, so it is built from the same three backend parts:
its forward is the bag's weight gradient, the gradient of x is the bag's forward with grad_h as
weights, and the rows' gradient is the bag's value-gradient rows with x as the output gradient
(row-sparse, like the bag's).

Implementations (`impl`): "torch" (torch ops: `F.embedding_bag` with per-sample weights on
fp32/fp64, chunked gathers with fp32 accumulation on bf16/fp16; any device), "cpu" (the torch
parts with the C++ forward and gradients of `memlayers.kernels.bag_cpu` where they apply), "triton" (the Triton
kernels of `memlayers.kernels.bag_triton`; on CPU only under TRITON_INTERPRET=1 set before triton
is imported), "auto" (CUDA -> triton, otherwise cpu). `embedding_bag_reference` is the plain
definition, differentiated by autograd (dense gradient), used as the oracle in tests.

Shape suffixes: see docs/shapes.md (here R is the reads of one bag, L = T * R).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from memlayers.kernels.segments import segments_of

IMPLS = ("auto", "torch", "cpu", "triton")


def embedding_bag_reference(values_NV: torch.Tensor, slots_TR: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
    """Plain torch gather + weighted sum in fp32 (fp64 for fp64 values); dense autograd gradient."""
    acc = torch.float64 if values_NV.dtype == torch.float64 else torch.float32
    rows_TRV = values_NV[slots_TR].to(acc)
    return torch.einsum("tr,trv->tv", weights_TR.to(acc), rows_TRV).to(values_NV.dtype)


def embedding_bag(values_NV: torch.Tensor, slots_TR: torch.Tensor, weights_TR: torch.Tensor, *,
                  sparse_grad: bool = True, impl: str = "auto") -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * values[slots[t, j]] -> (T, V) in the values' dtype.

    `slots_TR` may have any leading shape (..., R); the output then has shape (..., V).
    """
    if values_NV.dim() != 2:
        raise ValueError(f"values_NV must be 2-D (N, V), got shape {tuple(values_NV.shape)}")
    if slots_TR.shape != weights_TR.shape:
        raise ValueError(f"slots_TR {tuple(slots_TR.shape)} and weights_TR {tuple(weights_TR.shape)} differ in shape")
    if slots_TR.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slots_TR must be an integer tensor, got {slots_TR.dtype}")
    lead = slots_TR.shape[:-1]
    slots_2d = slots_TR.reshape(-1, slots_TR.shape[-1]).long()
    weights_2d = weights_TR.reshape(-1, weights_TR.shape[-1])
    backend = _backend(impl, values_NV.device)
    y_TV = _EmbeddingBag.apply(values_NV, slots_2d, weights_2d, sparse_grad, backend)
    return y_TV.view(*lead, values_NV.shape[1])


def row_dot(values_NV: torch.Tensor, slots_TR: torch.Tensor, x_TV: torch.Tensor, *,
            sparse_grad: bool = True, impl: str = "auto") -> torch.Tensor:
    """h[t, j] = <x[t], values[slots[t, j]]> -> (T, R) in fp32 (fp64 for fp64 values).

    `slots_TR` may have any leading shape (..., R) with `x_TV` of shape (..., V); the rows get a
    row-sparse gradient with `sparse_grad=True`, as with `embedding_bag`.
    """
    if values_NV.dim() != 2:
        raise ValueError(f"values_NV must be 2-D (N, V), got shape {tuple(values_NV.shape)}")
    if slots_TR.shape[:-1] != x_TV.shape[:-1] or x_TV.shape[-1] != values_NV.shape[1]:
        raise ValueError(f"x_TV {tuple(x_TV.shape)} must be slots_TR's leading shape {tuple(slots_TR.shape[:-1])} "
                         f"by the value dim {values_NV.shape[1]}")
    if slots_TR.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"slots_TR must be an integer tensor, got {slots_TR.dtype}")
    lead = slots_TR.shape[:-1]
    slots_2d = slots_TR.reshape(-1, slots_TR.shape[-1]).long()
    x_2d = x_TV.reshape(-1, x_TV.shape[-1])
    h_TR = _RowDot.apply(values_NV, slots_2d, x_2d, sparse_grad, _backend(impl, values_NV.device))
    return h_TR.view(*lead, slots_TR.shape[-1])


def _backend(impl: str, device: torch.device) -> ModuleType:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "cpu"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
                           "before triton is first imported")
    return importlib.import_module(f"memlayers.kernels.bag_{impl}")


class _EmbeddingBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_NV, slots_TR, weights_TR, sparse_grad, backend):
        ctx.save_for_backward(values_NV, slots_TR, weights_TR)
        ctx.sparse_grad, ctx.backend = sparse_grad, backend
        return backend.forward(values_NV, slots_TR, weights_TR)

    @staticmethod
    def backward(ctx, grad_y_TV):
        values_NV, slots_TR, weights_TR = ctx.saved_tensors
        grad_y_TV = grad_y_TV.contiguous()
        grad_values = grad_weights = None
        fused = getattr(ctx.backend, "value_and_weight_grad", None)
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[2] and fused is not None:
            found = fused(grad_y_TV, weights_TR, slots_TR, values_NV)
            if found is not None:
                unique_U, rows_UV, grad_TR = found
                return (_scatter_rows(rows_UV.to(values_NV.dtype), unique_U, values_NV, ctx.sparse_grad), None,
                        grad_TR.to(weights_TR.dtype), None, None)
        if ctx.needs_input_grad[0]:
            grad_values = _values_grad(ctx.backend, grad_y_TV, weights_TR, slots_TR, values_NV, ctx.sparse_grad)
        if ctx.needs_input_grad[2]:
            grad_weights = ctx.backend.weight_grad(values_NV, slots_TR, grad_y_TV).to(weights_TR.dtype)
        return grad_values, None, grad_weights, None, None


class _RowDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values_NV, slots_TR, x_TV, sparse_grad, backend):
        x_TV = x_TV.contiguous()
        ctx.save_for_backward(values_NV, slots_TR, x_TV)
        ctx.sparse_grad, ctx.backend = sparse_grad, backend
        return backend.weight_grad(values_NV, slots_TR, x_TV)

    @staticmethod
    def backward(ctx, grad_h_TR):
        values_NV, slots_TR, x_TV = ctx.saved_tensors
        grad_h_TR = grad_h_TR.contiguous()
        grad_values = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_values = _values_grad(ctx.backend, x_TV, grad_h_TR, slots_TR, values_NV, ctx.sparse_grad)
        if ctx.needs_input_grad[2]:
            grad_x = ctx.backend.forward(values_NV, slots_TR, grad_h_TR).to(x_TV.dtype)
        return grad_values, None, grad_x, None, None


def _values_grad(backend: ModuleType, grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, slots_TR: torch.Tensor,
                 values_NV: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The values' gradient: the backend's `value_grad` where it has one that applies, else by sorted segments."""
    fused = getattr(backend, "value_grad", None)
    found = fused(grad_y_TV, weights_TR, slots_TR, values_NV.shape[0]) if fused is not None else None
    if found is None:
        segs = segments_of(slots_TR, values_NV.shape[0])
        found = segs.unique_U, backend.value_grad_rows(grad_y_TV, weights_TR, segs)
    unique_U, rows_UV = found
    return _scatter_rows(rows_UV.to(values_NV.dtype), unique_U, values_NV, sparse)


def _scatter_rows(rows_UV: torch.Tensor, unique_U: torch.Tensor, values_NV: torch.Tensor, sparse: bool) -> torch.Tensor:
    """The unique rows' gradient as a coalesced sparse (N, V) tensor, or dense when not `sparse`."""
    if sparse:
        return torch.sparse_coo_tensor(unique_U[None], rows_UV, values_NV.shape,
                                       is_coalesced=True, check_invariants=False)
    return values_NV.new_zeros(values_NV.shape).index_copy_(0, unique_U, rows_UV)
