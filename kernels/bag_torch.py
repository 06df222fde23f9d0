"""The torch implementation of the embedding bag (CPU, or any device): forward and backward parts.

- forward: `F.embedding_bag` with per-sample weights on fp32/fp64 tables (the fused CPU kernel
  reads the R rows of a bag without materialising them); on bf16/fp16 tables, chunks of gathered
  rows upcast to fp32 (fp32 accumulation whatever the storage);
- value gradient rows: an embedding bag *over the output gradient*: segment u of the sorted reads
  sums weight * grad_y[token] for every read of row u (offsets = segment starts), in fp32 — a
  deterministic segment reduction with no (L, V) intermediate;
- weight gradient: on fp32/fp64 tables, aten's fused per-sample-weights gradient of the embedding
  bag (one pass: the dot of grad_y with each read row, nothing materialised); otherwise chunks of
  gathered rows upcast to fp32 times grad_y (batched dot products).

All work is O(T*R*V): nothing here touches rows that were not read.
Shape suffixes: see docs/shapes.md (a chunk of tokens keeps the letter T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlayers.kernels.segments import Segments

CHUNK_ELEMENTS = 1 << 22  # gathered (T, R, V) elements per chunk: 16 MB in fp32


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(values_NV: torch.Tensor, slots_TR: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
    if values_NV.dtype in (torch.float32, torch.float64):
        return F.embedding_bag(slots_TR, values_NV, per_sample_weights=weights_TR.to(values_NV.dtype), mode="sum")
    y_TV = values_NV.new_empty(slots_TR.shape[0], values_NV.shape[1])
    for lo, hi in _chunks(slots_TR.shape[0], slots_TR.shape[1] * values_NV.shape[1]):
        rows_TRV = values_NV[slots_TR[lo:hi]].float()
        y_TV[lo:hi] = torch.bmm(weights_TR[lo:hi, None, :].float(), rows_TRV).squeeze(1)
    return y_TV


def value_grad_rows(grad_y_TV: torch.Tensor, weights_TR: torch.Tensor, segs: Segments) -> torch.Tensor:
    """-> (U, V) in the accumulation dtype: row u = sum over reads of slot u of weight * grad_y[token]."""
    acc = accumulate_dtype(grad_y_TV.dtype)
    if segs.read_L.numel() == 0:
        return grad_y_TV.new_zeros(0, grad_y_TV.shape[1], dtype=acc)
    weights_L = weights_TR.reshape(-1)[segs.read_L].to(acc)
    return F.embedding_bag(segs.token_L, grad_y_TV.to(acc), segs.start_U1[:-1],
                           per_sample_weights=weights_L, mode="sum")


def weight_grad(values_NV: torch.Tensor, slots_TR: torch.Tensor, grad_y_TV: torch.Tensor) -> torch.Tensor:
    """-> (T, R) in the accumulation dtype: <grad_y[t], values[slots[t, j]]>."""
    acc = accumulate_dtype(values_NV.dtype)
    (t, r), fused = slots_TR.shape, getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if values_NV.dtype == acc and fused is not None:
        offsets_T = torch.arange(0, t * r, r, device=slots_TR.device)
        bag_L = torch.arange(t, device=slots_TR.device).repeat_interleave(r)
        mode_sum, no_padding = 0, -1
        return fused(grad_y_TV.to(acc), values_NV, slots_TR.reshape(-1), offsets_T, bag_L,
                     mode_sum, no_padding).view(t, r)
    grad_TR = torch.empty(slots_TR.shape, dtype=acc, device=slots_TR.device)
    for lo, hi in _chunks(slots_TR.shape[0], slots_TR.shape[1] * values_NV.shape[1]):
        rows_TRV = values_NV[slots_TR[lo:hi]].to(acc)
        grad_TR[lo:hi] = torch.bmm(rows_TRV, grad_y_TV[lo:hi, :, None].to(acc)).squeeze(-1)
    return grad_TR


def _chunks(tokens: int, elements_per_token: int):
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_token))
    for lo in range(0, tokens, step):
        yield lo, min(tokens, lo + step)
