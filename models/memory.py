"""Product-key memory layers: Lample et al.'s PKM and the paper's Memory+.

Per token and head h, the query (key dim K, two halves of K/2) scores n sub-keys per half;
the top-k of each half give k*k candidate pairs whose summed scores are exact full-key scores,
and their top-k are the slots read (slot = i1 * n + i2). The k weights are a fp32 softmax, the
read is an embedding bag over the value table (summed over heads and slots).

- pkm:          out = y
- memory_plus:  qk-norm (RMS-normalised query halves with a learnable gain, unit-RMS sub-keys,
                scores scaled by `temperature`, default sqrt(K/2)), then out = W_o(y * silu(W_g x)).

The table is either the layer's own (`values=None`) or a table owned by the model and shared
with other layers: a shared table is held by reference, not registered as a sub-module, so its
parameter appears once in the model.

Legend: T tokens, D model dim, H heads, n sub-keys per half, P = K/2 half key dim,
k rows read per head, V value dim.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.config import MemoryConfig
from memlayers.models.init import trunc_normal_
from memlayers.models.values import ValueTable


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@functools.lru_cache(maxsize=None)
def candidate_pairs(topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) positions in two descending top-k lists that can hold one of the k best sums.

    Pair (i, j) is beaten by every (i', j') with i' <= i and j' <= j, so it can only be in the
    top-k when (i + 1) * (j + 1) <= k: about k * ln(k) pairs instead of k * k (50 for k = 16).
    """
    pairs = [(i, j) for i in range(topk) for j in range(topk) if (i + 1) * (j + 1) <= topk]
    rows, cols = zip(*pairs)
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)


def product_key_topk(q1_THP: torch.Tensor, q2_THP: torch.Tensor, keys1_HnP: torch.Tensor,
                     keys2_HnP: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n full keys via the product structure -> (scores_THk, slots_THk)."""
    n = keys1_HnP.shape[1]
    s1_THn = torch.einsum("thp,hnp->thn", q1_THP, keys1_HnP)
    s2_THn = torch.einsum("thp,hnp->thn", q2_THP, keys2_HnP)
    v1_THk, i1_THk = s1_THn.topk(topk, dim=-1)   # sorted, best first
    v2_THk, i2_THk = s2_THn.topk(topk, dim=-1)
    rows_C, cols_C = candidate_pairs(topk, s1_THn.device)
    pair_scores_THC = v1_THk.index_select(-1, rows_C) + v2_THk.index_select(-1, cols_C)
    scores_THk, pick_THk = pair_scores_THC.topk(topk, dim=-1)
    slots_THk = i1_THk.gather(-1, rows_C[pick_THk]) * n + i2_THk.gather(-1, cols_C[pick_THk])
    return scores_THk, slots_THk


class MemoryLayer(nn.Module):
    def __init__(self, dim: int, cfg: MemoryConfig, values: ValueTable | None = None, *,
                 key_dim: int | None = None, qk_norm: bool = True, gated: bool = True) -> None:
        super().__init__()
        self.heads, self.topk, self.n = cfg.heads, cfg.topk, cfg.sub_keys
        self.key_dim = key_dim or cfg.key_dim or max(2, 2 * (dim // 8))
        self.half_dim = self.key_dim // 2
        self.qk_norm, self.gated = qk_norm, gated
        self.temperature = cfg.temperature or self.half_dim ** 0.5
        self.query = nn.Linear(dim, self.heads * self.key_dim, bias=False)
        self.keys_2HnP = nn.Parameter(torch.empty(2, self.heads, self.n, self.half_dim))
        self.query_gain_P = nn.Parameter(torch.ones(self.half_dim)) if qk_norm else None
        if values is None:
            self.values = ValueTable(cfg.slots, dim, sparse_grad=cfg.sparse_grad)
            self._shared_values: list[ValueTable] = []
        else:
            self._shared_values = [values]
        value_dim = self.table.value_dim
        if gated:
            self.gate = nn.Linear(dim, value_dim, bias=False)
            self.out = nn.Linear(value_dim, dim, bias=False)
        self.last_slots_TK: torch.Tensor | None = None

    @property
    def table(self) -> ValueTable:
        return self._shared_values[0] if self._shared_values else self.values

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.query.weight, std)
        bound = self.half_dim ** -0.5
        nn.init.uniform_(self.keys_2HnP, -bound, bound)
        if self.query_gain_P is not None:
            nn.init.ones_(self.query_gain_P)
        if self.gated:
            trunc_normal_(self.gate.weight, std)
            trunc_normal_(self.out.weight, out_std)
        if not self._shared_values:
            self.values.init_weights()

    def search(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (scores_THk, slots_THk) for the tokens x_TD."""
        q_THK = self.query(x_TD).view(x_TD.shape[0], self.heads, self.key_dim).float()
        q1_THP, q2_THP = q_THK[..., : self.half_dim], q_THK[..., self.half_dim:]
        keys1_HnP, keys2_HnP = self.keys_2HnP[0].float(), self.keys_2HnP[1].float()
        if self.qk_norm:
            # unit-RMS vectors of dim P have dot products P * cos: scale to temperature * cos
            gain_P = self.query_gain_P.float() * (self.temperature / self.half_dim)
            q1_THP, q2_THP = rms_normalise(q1_THP) * gain_P, rms_normalise(q2_THP) * gain_P
            keys1_HnP, keys2_HnP = rms_normalise(keys1_HnP), rms_normalise(keys2_HnP)
        return product_key_topk(q1_THP, q2_THP, keys1_HnP, keys2_HnP, self.topk)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        scores_THk, slots_THk = self.search(x_TD)
        weights_THk = F.softmax(scores_THk, dim=-1)
        slots_TK = slots_THk.flatten(1)
        self.last_slots_TK = slots_TK.detach()
        y_TV = self.table(slots_TK, weights_THk.flatten(1))
        if self.gated:
            y_TV = self.out(y_TV * F.silu(self.gate(x_TD)).to(y_TV.dtype))
        return y_TV.view_as(x_BTD).to(x_BTD.dtype)
