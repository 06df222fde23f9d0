"""Mixture of experts: token-choice top-k router (fp32 softmax), dropless dispatch, Switch loss.

Each token picks its top-k experts from a softmax over E router logits computed in fp32; the
k gate weights are renormalised to sum to 1 when k > 1. At k = 1 the expert output is scaled by
the raw probability instead, as in Switch: a renormalised gate would be identically 1 and the
router would learn from the balance loss only. Dispatch is dropless: the T*k (token, expert)
assignments are sorted by expert and every expert runs on its contiguous slice. The
Switch-Transformer load-balancing loss E * sum_e f_e * P_e (f_e: fraction of assignments to
expert e, P_e: mean router probability of e) is kept in `balance_loss` after each forward.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.feedforward import SwiGLU
from memlayers.models.init import trunc_normal_


class MoE(nn.Module):
    def __init__(self, dim: int, expert_hidden_dim: int, experts: int, topk: int, shared_hidden_dim: int | None) -> None:
        super().__init__()
        self.experts, self.topk = experts, topk
        self.router = nn.Linear(dim, experts, bias=False)
        self.w1_EDF = nn.Parameter(torch.empty(experts, dim, expert_hidden_dim))
        self.w3_EDF = nn.Parameter(torch.empty(experts, dim, expert_hidden_dim))
        self.w2_EFD = nn.Parameter(torch.empty(experts, expert_hidden_dim, dim))
        self.shared = SwiGLU(dim, shared_hidden_dim) if shared_hidden_dim else None
        self.balance_loss = torch.zeros(())
        self.last_load_E = torch.zeros(experts)

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.router.weight, std)
        trunc_normal_(self.w1_EDF, std)
        trunc_normal_(self.w3_EDF, std)
        trunc_normal_(self.w2_EFD, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        T = x_TD.shape[0]
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        gate_TK, expert_TK = probs_TE.topk(self.topk, dim=-1)
        if self.topk > 1:  # at top-1 a renormalised gate would be 1: keep the probability (Switch)
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)

        expert_L = expert_TK.reshape(-1)
        order_L = torch.argsort(expert_L, stable=True)
        token_L = order_L // self.topk
        counts_E = torch.bincount(expert_L, minlength=self.experts)
        out_TD = torch.zeros_like(x_TD)
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            tokens = token_L[start:start + count]
            x_CD = x_TD[tokens]
            h_CF = F.silu(x_CD @ self.w1_EDF[e]) * (x_CD @ self.w3_EDF[e])
            y_CD = (h_CF @ self.w2_EFD[e]) * gate_TK.reshape(-1)[order_L[start:start + count], None].to(x_CD.dtype)
            out_TD = out_TD.index_add(0, tokens, y_CD)
            start += count

        load_E = counts_E.float() / max(1, expert_L.numel())
        self.last_load_E = load_E.detach()
        self.balance_loss = self.experts * (load_E * probs_TE.mean(0)).sum()
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view_as(x_BSD)


def load_imbalance(load_E: torch.Tensor) -> float:
    """max load / uniform load (1.0 is perfectly balanced)."""
    return float(load_E.max() * load_E.numel()) if load_E.numel() else math.nan
