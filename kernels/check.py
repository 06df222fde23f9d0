"""Correctness check of an embedding-bag backend against the plain reference, on small random cases.

`random_case` draws a table, slots and softmax weights with duplicate slots inside a bag and
across bags (the cases a segment reduction can get wrong). `backend_errors` runs a backend's three
parts (forward, value-gradient rows, weight gradient) into outputs poisoned with NaN beforehand, so
an element the kernel forgets to write shows up as an error, and returns the max-norm relative
error of each part against `embedding_bag_reference` differentiated by autograd (in fp64).
`densify_grad` lets `torch.autograd.gradcheck` check a sparse value gradient. Used by the tests
(Triton under TRITON_INTERPRET=1) and by `memlayers bench kernels`.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from memlayers.kernels.lookup import embedding_bag_reference
from memlayers.kernels.segments import segments_of


@dataclass
class Case:
    values_NV: torch.Tensor
    slots_TR: torch.Tensor
    weights_TR: torch.Tensor
    grad_y_TV: torch.Tensor


def random_case(n: int, v: int, t: int, r: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Random case with a duplicate slot in bag 0 and slot 0 read by every bag (needs r >= 3)."""
    gen = torch.Generator().manual_seed(seed)
    slots_TR = torch.randint(0, n, (t, r), generator=gen)
    slots_TR[0, 1] = slots_TR[0, 2]      # the same row twice in one bag
    slots_TR[:, 0] = 0                   # one row read by every bag
    weights_TR = torch.softmax(torch.randn(t, r, generator=gen), dim=-1)
    values_NV = torch.randn(n, v, generator=gen).to(dtype)
    grad_y_TV = torch.randn(t, v, generator=gen).to(dtype)
    return Case(values_NV, slots_TR, weights_TR, grad_y_TV)


def reference_parts(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_TV, grad rows of the unique slots U x V, grad_weights_TR), in fp64 from the same inputs."""
    values = case.values_NV.to(torch.float64).requires_grad_()
    weights = case.weights_TR.to(torch.float64).requires_grad_()
    y_TV = embedding_bag_reference(values, case.slots_TR, weights)
    y_TV.backward(case.grad_y_TV.to(torch.float64))
    return y_TV.detach(), values.grad[segments_of(case.slots_TR).unique_U], weights.grad


def backend_errors(backend: ModuleType, case: Case) -> dict[str, float]:
    """Max-norm relative errors {forward, value_grad, weight_grad} of `backend` on `case`, outputs poisoned."""
    (t, r), v = case.slots_TR.shape, case.values_NV.shape[1]
    segs = segments_of(case.slots_TR)
    acc = torch.float64 if case.values_NV.dtype == torch.float64 else torch.float32
    nan = float("nan")
    y_TV = backend.forward(case.values_NV, case.slots_TR, case.weights_TR,
                           out=torch.full((t, v), nan, dtype=case.values_NV.dtype))
    rows_UV = backend.value_grad_rows(case.grad_y_TV, case.weights_TR, segs,
                                      out=torch.full((segs.unique_U.numel(), v), nan, dtype=acc))
    grad_w_TR = backend.weight_grad(case.values_NV, case.slots_TR, case.grad_y_TV,
                                    out=torch.full((t, r), nan, dtype=acc))
    ref = reference_parts(case)
    return {name: relative_error(got, want) for name, got, want in
            zip(("forward", "value_grad", "weight_grad"), (y_TV, rows_UV, grad_w_TR), ref)}


class _DensifyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def densify_grad(x: torch.Tensor) -> torch.Tensor:
    """Identity whose backward makes a sparse gradient dense: lets gradcheck (which wants the
    input's layout) check the row-sparse value gradient."""
    return _DensifyGrad.apply(x)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN anywhere in `got` -> inf)."""
    got = got.to(torch.float64)
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
