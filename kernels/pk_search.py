"""The product-key search on CPU in one fused op: scoring, both top-ks, the exact pair merge.

    scores_THK, rows_THK = product_key_search(q1_THQ, q2_THQ, keys1_HnQ, keys2_HnQ, topk)
    scores_THK, rows_THK = product_key_search_packed(q_TH2Q, keys_2HnQ, topk)   # halves side by side
    scores_THK, rows_THK = normed_product_key_search(q_TH2Q, keys_2HnQ, gain_Q, scale, topk, eps)  # with qk-norm

gives the top-`topk` full-key scores of every (token, head) over the n*n rows whose full key is
the concatenation of sub-keys i1 (first half) and i2 (second half), row = i1 * n + i2. Small
sub-key tables (n * Q up to `SCORED_IN_OP_ELEMENTS`) are scored inside the C++ op, one row at a
time into a buffer that stays in cache (the (H, T, n) scores are never stored); larger ones by
one batched matmul per half. The rest runs in `cpu_ops.cpp`: per (token, head) the top-k of each
half's n scores, then the top-k of the pair sums over the candidate pairs (i + 1)(j + 1) <= k of
the two sorted lists (the only pairs that can be among the k best; `memlayers.models.product_keys`).

`normed_product_key_search` is the search of Memory+'s qk-norm in the same op: the query halves
RMS-normalised with a gain, the sub-keys to unit RMS (`cpu_ops.rms_rows`), then the search; its
backward runs the three backwards in C++ (one autograd node instead of the norm's element-wise
chain of about ten).

Ties are ranked deterministically: a sub-key list by (score desc, sub-key index asc), the pairs by
(sum desc, i asc, j asc). That order on full keys is a total order under which the candidate
pairs always hold the top-k, so the search stays exact with ties; torch's `topk` leaves the order
of ties unspecified, so the torch path and this op agree on the scores and, without ties, the rows.

The backward is sparse: the selected score of row (i1, i2) is q1 . keys1[i1] + q2 . keys2[i2], so
each selection adds grad * keys to the query halves and grad * query to the two sub-keys it used
(O(T H K Q), no (T, H, n) gradient). Sub-key gradients are summed in token order, in fp64.

`applies(...)` says whether this op can run (CPU fp32/fp64 tensors, the C++ ops built and
selected: `memlayers.kernels.cpu_ops`); otherwise callers take their torch path.
Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch

from memlayers.kernels import cpu_ops


def applies(*tensors: torch.Tensor) -> bool:
    """True when `product_key_search` can run on these tensors."""
    return cpu_ops.applies(*tensors) is not None


def _ops_for(caller: str, *tensors: torch.Tensor):
    """The C++ ops for these tensors, or a RuntimeError naming the caller."""
    ops = cpu_ops.applies(*tensors)
    if ops is None:
        raise RuntimeError(f"{caller}: the C++ CPU ops do not apply here (see kernels.cpu_ops)")
    return ops


def product_key_search_packed(q_TH2Q: torch.Tensor, keys_2HnQ: torch.Tensor,
                              topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-`topk` over all n*n full keys -> (scores_THK, rows_THK), best first; differentiable
    in the scores. Query halves side by side (T, H, 2, Q) and sub-keys (2, H, n, Q), the layout the
    layers project and normalise them in, so neither is split into copies (nor their gradients
    assembled from halves)."""
    ops = _ops_for("product_key_search", q_TH2Q, keys_2HnQ)
    dtype = torch.promote_types(q_TH2Q.dtype, keys_2HnQ.dtype)
    return _ProductKeySearch.apply(q_TH2Q.to(dtype), keys_2HnQ.to(dtype), topk, ops)


def product_key_search(q1_THQ: torch.Tensor, q2_THQ: torch.Tensor, keys1_HnQ: torch.Tensor,
                       keys2_HnQ: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`product_key_search_packed` of separate halves (T, H, Q) x 2 and (H, n, Q) x 2."""
    return product_key_search_packed(torch.stack([q1_THQ, q2_THQ], dim=2), torch.stack([keys1_HnQ, keys2_HnQ]), topk)


def normed_product_key_search(q_TH2Q: torch.Tensor, keys_2HnQ: torch.Tensor, gain_Q: torch.Tensor, scale: float,
                              topk: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`product_key_search_packed` of the qk-normed queries and sub-keys: each query half
    x * rsqrt(mean(x^2) + eps) * (gain_Q * scale), each sub-key to unit RMS (no gain);
    differentiable in the queries, the sub-keys and the gain."""
    ops = _ops_for("normed_product_key_search", q_TH2Q, keys_2HnQ, gain_Q)
    dtype = torch.promote_types(q_TH2Q.dtype, keys_2HnQ.dtype)
    return _NormedProductKeySearch.apply(q_TH2Q.to(dtype), keys_2HnQ.to(dtype), gain_Q.to(dtype), scale, topk, eps, ops)


SCORED_IN_OP_ELEMENTS = 1024  # n * Q up to which scoring in the op beats the batched matmuls on CPU


def _forward(ops, q_TH2Q, keys_2HnQ, topk: int):
    """(scores_THK, rows_THK, subs_THK2): scored in the op for small sub-key tables, else by batched matmuls."""
    if keys_2HnQ.shape[2] * keys_2HnQ.shape[3] <= SCORED_IN_OP_ELEMENTS:
        return ops.search_forward(q_TH2Q, keys_2HnQ, topk)
    s1_HTn = torch.bmm(q_TH2Q[:, :, 0].transpose(0, 1), keys_2HnQ[0].transpose(1, 2))
    s2_HTn = torch.bmm(q_TH2Q[:, :, 1].transpose(0, 1), keys_2HnQ[1].transpose(1, 2))
    return ops.topk_merge(s1_HTn, s2_HTn, topk)


class _ProductKeySearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_TH2Q, keys_2HnQ, topk, ops):
        scores_THK, rows_THK, subs_THK2 = _forward(ops, q_TH2Q, keys_2HnQ, topk)
        ctx.save_for_backward(q_TH2Q, keys_2HnQ, subs_THK2)
        ctx.ops = ops
        ctx.mark_non_differentiable(rows_THK)
        return scores_THK, rows_THK

    @staticmethod
    def backward(ctx, grad_THK, _grad_rows):
        q_TH2Q, keys_2HnQ, subs_THK2 = ctx.saved_tensors
        grad_q, grad_keys = ctx.ops.search_backward(grad_THK, subs_THK2, q_TH2Q, keys_2HnQ)
        return (grad_q if ctx.needs_input_grad[0] else None, grad_keys if ctx.needs_input_grad[1] else None, None, None)


class _NormedProductKeySearch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_TH2Q, keys_2HnQ, gain_Q, scale, topk, eps, ops):
        gain_Q = gain_Q * scale
        qn_TH2Q, q_rstd = ops.rms_rows(q_TH2Q, gain_Q, eps)
        kn_2HnQ, k_rstd = ops.rms_rows(keys_2HnQ, None, eps)
        scores_THK, rows_THK, subs_THK2 = _forward(ops, qn_TH2Q, kn_2HnQ, topk)
        ctx.save_for_backward(q_TH2Q, keys_2HnQ, gain_Q, q_rstd, k_rstd, qn_TH2Q, kn_2HnQ, subs_THK2)
        ctx.ops, ctx.scale = ops, scale
        ctx.mark_non_differentiable(rows_THK)
        return scores_THK, rows_THK

    @staticmethod
    def backward(ctx, grad_THK, _grad_rows):
        q_TH2Q, keys_2HnQ, gain_Q, q_rstd, k_rstd, qn_TH2Q, kn_2HnQ, subs_THK2 = ctx.saved_tensors
        grad_qn, grad_kn = ctx.ops.search_backward(grad_THK, subs_THK2, qn_TH2Q, kn_2HnQ)
        grad_q, grad_gain = ctx.ops.rms_rows_backward(grad_qn, q_TH2Q, q_rstd, gain_Q)
        grad_keys = ctx.ops.rms_rows_backward(grad_kn, keys_2HnQ, k_rstd, None)[0] if ctx.needs_input_grad[1] else None
        return grad_q, grad_keys, grad_gain * ctx.scale, None, None, None, None
