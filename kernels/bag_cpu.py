"""The CPU implementation of the embedding bag: the torch parts, with the C++ weight gradient.

Same three parts as `memlayers.kernels.bag_torch` (forward, value-gradient rows, weight
gradient); the weight gradient (a dot product of grad_y with every read row) runs in one pass
of `cpu_ops.cpp` on fp32/fp64 tables when the C++ ops are built and selected
(`memlayers.kernels.cpu_ops`), and falls back to the torch part otherwise.
Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch

from memlayers.kernels import bag_torch, cpu_ops

forward = bag_torch.forward
value_grad_rows = bag_torch.value_grad_rows


def weight_grad(values_NV: torch.Tensor, slots_TR: torch.Tensor, grad_y_TV: torch.Tensor) -> torch.Tensor:
    """-> (T, R) in the accumulation dtype: <grad_y[t], values[slots[t, j]]>."""
    ops = cpu_ops.applies(values_NV, grad_y_TV)
    if ops is None:
        return bag_torch.weight_grad(values_NV, slots_TR, grad_y_TV)
    return ops.bag_weight_grad(values_NV, slots_TR, grad_y_TV)
