"""The memory value lookup: an embedding bag over a value table.

    y_TV[t] = sum_j weights_TK[t, j] * values_NV[slots_TK[t, j]]

Legend: N slots in the table, V value dim, T tokens (flattened batch), K reads per token.
This is the one op every memory layer calls; faster implementations plug in behind it.
"""

from __future__ import annotations

import torch


def embedding_bag_reference(values_NV: torch.Tensor, slots_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Plain torch gather + weighted sum; autograd gives a dense gradient for `values_NV`."""
    rows_TKV = values_NV[slots_TK]
    return torch.einsum("tk,tkv->tv", weights_TK.to(rows_TKV.dtype), rows_TKV)


def embedding_bag(values_NV: torch.Tensor, slots_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """The dispatching entry point used by the models."""
    return embedding_bag_reference(values_NV, slots_TK, weights_TK)
