"""The CPU implementation of the embedding bag: the torch parts, with C++ forward and backward parts.

Same three parts as `memlayers.kernels.bag_torch` (forward, value-gradient rows, weight
gradient); the forward is `cpu_ops.bag_forward` for fp32 rows of 16 to 64 entries with AVX-512
(the same numbers as F.embedding_bag: one fused multiply-add per read in read order; with the
value rows prefetched, which a training step's out-of-cache table needs), plus `value_grad`: the
row-sparse value gradient in one C++ pass (a counting sort of
the reads by slot, then each row summed in a register in the sorted segments' order), with no
`Segments` tensors in between. On fp32/fp64 tables, when the C++ ops are built and selected
(`memlayers.kernels.cpu_ops`), the weight gradient (a dot product of grad_y with every read row)
and `value_grad` each run in one pass of `cpu_ops.cpp`, and `value_and_weight_grad` does both in
one pass; otherwise the torch parts run (`value_grad` and `value_and_weight_grad` return None).
Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch

from memlayers.kernels import bag_torch, cpu_ops
from memlayers.kernels.segments import counting_pass_pays

value_grad_rows = bag_torch.value_grad_rows


def forward(values_NV: torch.Tensor, slots_TR: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
    """-> (T, V): `cpu_ops.bag_forward` where it applies (fp32 rows of 16 to 64 entries, AVX-512: the same
    numbers as F.embedding_bag, with the value rows prefetched), else `bag_torch.forward`."""
    ops = cpu_ops.applies(values_NV, weights_TR)
    y_TV = ops.bag_forward(values_NV, slots_TR, weights_TR) if ops is not None else None
    return y_TV if y_TV is not None else bag_torch.forward(values_NV, slots_TR, weights_TR)


def weight_grad(values_NV: torch.Tensor, slots_TR: torch.Tensor, grad_y_TV: torch.Tensor) -> torch.Tensor:
    """-> (T, R) in the accumulation dtype: <grad_y[t], values[slots[t, j]]>."""
    ops = cpu_ops.applies(values_NV, grad_y_TV)
    if ops is None:
        return bag_torch.weight_grad(values_NV, slots_TR, grad_y_TV)
    return ops.bag_weight_grad(values_NV, slots_TR, grad_y_TV)


def value_grad(grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, slots_TR: torch.Tensor,
               n_slots: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """-> (unique_U, rows_UV in the accumulation dtype), the rows summed as the sorted segments sum them;
    None where the C++ op does not apply (then: `segments_of` + `value_grad_rows`)."""
    found = _value_pass(grad_y_TV, weights_TR, slots_TR, n_slots, None)
    return None if found is None else (found[0], found[1])


def _value_pass(grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, slots_TR: torch.Tensor, n_slots: int,
                values_NV: torch.Tensor | None) -> list[torch.Tensor] | None:
    """`cpu_ops.bag_value_grad` (with the weight gradient when `values_NV` is given) where the C++ op
    applies and its counting pass pays, else None."""
    ops = cpu_ops.applies(grad_y_TV, weights_TR, *([] if values_NV is None else [values_NV]))
    if ops is None or not counting_pass_pays(n_slots, slots_TR.numel()):
        return None
    acc = bag_torch.accumulate_dtype(grad_y_TV.dtype)
    return ops.bag_value_grad(slots_TR, weights_TR, grad_y_TV.to(acc), n_slots, values_NV)


# The one-pass backward is a single-threaded walk over the slots: it pays for short rows on one thread,
# not for wide rows or several threads, where the weight gradient's own pass runs in parallel over
# tokens (side-by-side timings: docs/bench/performance-2026-12-02.md).
FUSED_MAX_VALUE_DIM = 64


def value_and_weight_grad(grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, slots_TR: torch.Tensor,
                          values_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`value_grad` and `weight_grad` in one C++ pass -> (unique_U, rows_UV, grad_TR): each read's
    weight gradient is taken while its slot's value row is summed (the row is in cache then); the
    same numbers as the two apart. None where the op does not apply (values not in the
    accumulation dtype, rows wider than FUSED_MAX_VALUE_DIM, more than one thread, or the sort
    does not pay)."""
    if (values_NV.dtype != bag_torch.accumulate_dtype(grad_y_TV.dtype) or values_NV.shape[1] > FUSED_MAX_VALUE_DIM
            or torch.get_num_threads() > 1):
        return None
    found = _value_pass(grad_y_TV, weights_TR, slots_TR, values_NV.shape[0], values_NV)
    return None if found is None else tuple(found)
