"""Product-key search (Lample et al. 2019): exact top-k over N = n*n keys at the cost of 2n.

Per token and head, a query of two halves (dim Q each, key dim 2Q) scores n sub-keys per half;
the top-k of each half give candidate pairs whose summed scores are exact full-key scores
(the full key of row i1 * n + i2 is the concatenation of sub-keys i1 and i2), and their top-k
are the rows selected. With qk-norm the query halves are RMS-normalised with a learnable gain,
the sub-keys have unit RMS, and scores are cosines scaled by `temperature` (default sqrt(Q)).

`ProductKeySearch` owns the query projection and the sub-keys; the memory layers (PKM,
Memory+) and PEER build on it. Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.kernels import pk_search
from memlayers.models.init import trunc_normal_

RMS_EPS = 1e-6  # qk-norm: x * rsqrt(mean(x^2) + eps) over each half's Q dims


@functools.lru_cache(maxsize=None)
def candidate_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) positions in two descending top-k lists that can hold one of the k best sums.

    Pair (i, j) is beaten by every (i', j') with i' <= i and j' <= j, so it can only be in the
    top-k when (i + 1) * (j + 1) <= k: about k * ln(k) pairs instead of k * k (50 for k = 16).
    """
    pairs = [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]
    rows, cols = zip(*pairs)
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)


def product_key_topk(q_TH2Q: torch.Tensor, keys_2HnQ: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n full keys via the product structure -> (scores_THK, rows_THK), from
    the query halves side by side (T, H, 2, Q) and the sub-keys (2, H, n, Q).

    On CPU (fp32/fp64) the fused C++ search of `memlayers.kernels.pk_search`, elsewhere (CUDA,
    or `MEMLAYERS_CPU_OPS=torch`) `product_key_topk_torch`: the same scores and rows.
    """
    if pk_search.applies(q_TH2Q, keys_2HnQ):
        return pk_search.product_key_search_packed(q_TH2Q, keys_2HnQ, topk)
    return product_key_topk_torch(q_TH2Q[:, :, 0], q_TH2Q[:, :, 1], keys_2HnQ[0], keys_2HnQ[1], topk)


def product_key_topk_torch(q1_THQ: torch.Tensor, q2_THQ: torch.Tensor, keys1_HnQ: torch.Tensor,
                           keys2_HnQ: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`product_key_topk` in torch ops (any device); the order of tied scores is torch.topk's."""
    n = keys1_HnQ.shape[1]
    s1_THn = torch.einsum("thq,hnq->thn", q1_THQ, keys1_HnQ)
    s2_THn = torch.einsum("thq,hnq->thn", q2_THQ, keys2_HnQ)
    v1_THK, i1_THK = s1_THn.topk(topk, dim=-1)   # sorted, best first
    v2_THK, i2_THK = s2_THn.topk(topk, dim=-1)
    rows_J, cols_J = candidate_pairs(topk, s1_THn.device)
    pair_scores_THJ = v1_THK.index_select(-1, rows_J) + v2_THK.index_select(-1, cols_J)
    scores_THK, pick_THK = pair_scores_THJ.topk(topk, dim=-1)
    rows_THK = i1_THK.gather(-1, rows_J[pick_THK]) * n + i2_THK.gather(-1, cols_J[pick_THK])
    return scores_THK, rows_THK


class ProductKeySearch(nn.Module):
    """Query projection + sub-keys of `heads` product keys over n*n rows; `search` -> top-`topk` rows."""

    def __init__(self, dim: int, heads: int, sub_keys: int, topk: int, key_dim: int, *,
                 qk_norm: bool, temperature: float | None = None) -> None:
        super().__init__()
        self.heads, self.topk, self.n = heads, topk, sub_keys
        self.key_dim, self.half_dim = key_dim, key_dim // 2
        self.qk_norm = qk_norm
        self.temperature = temperature or self.half_dim ** 0.5
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.keys_2HnQ = nn.Parameter(torch.empty(2, heads, sub_keys, self.half_dim))
        self.query_gain_Q = nn.Parameter(torch.ones(self.half_dim)) if qk_norm else None

    def init_keys(self, std: float) -> None:
        trunc_normal_(self.query.weight, std)
        bound = self.half_dim ** -0.5
        nn.init.uniform_(self.keys_2HnQ, -bound, bound)
        if self.query_gain_Q is not None:
            nn.init.ones_(self.query_gain_Q)

    def search(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores_THK fp32, rows_THK) for the tokens x_TD."""
        q_TH2Q = self.query(x_TD).view(x_TD.shape[0], self.heads, 2, self.half_dim).float()
        keys_2HnQ = self.keys_2HnQ.float()
        if self.qk_norm:
            # unit-RMS vectors of dim Q have dot products Q * cos: scale to temperature * cos
            # (both halves in one fused op each way: the norm is over the last dim)
            scale = self.temperature / self.half_dim
            if pk_search.applies(q_TH2Q, keys_2HnQ):  # the norms and the search in one C++ op each way
                return pk_search.normed_product_key_search(q_TH2Q, keys_2HnQ, self.query_gain_Q.float(), scale,
                                                           self.topk, RMS_EPS)
            gain_Q = self.query_gain_Q.float() * scale
            q_TH2Q = F.rms_norm(q_TH2Q, (self.half_dim,), weight=gain_Q, eps=RMS_EPS)
            keys_2HnQ = F.rms_norm(keys_2HnQ, (self.half_dim,), eps=RMS_EPS)
        return product_key_topk(q_TH2Q, keys_2HnQ, self.topk)
