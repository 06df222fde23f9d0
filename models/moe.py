"""Mixture of experts: a fp32 softmax router over E SwiGLU experts, token choice or expert choice.

Token choice (`routing="token_choice"`, the default): each token picks its top-k experts; the k
gate weights are renormalised to sum to 1 when k > 1. At k = 1 the expert output is scaled by
the raw probability instead, as in Switch: a renormalised gate would be identically 1 and the
router would learn from the balance loss only. Dispatch is dropless: the T*k (token, expert)
assignments are sorted by expert and every expert runs on its contiguous slice. The
Switch-Transformer load-balancing loss E * sum_e f_e * P_e (f_e: fraction of assignments to
expert e, P_e: mean router probability of e) is kept in `balance_loss` after each forward.

Expert choice (`routing="expert_choice"`, Zhou et al. 2022): in training, every expert picks
its top-C tokens of the whole micro-batch by router probability, C = capacity_factor * T / E
(floored, at least 1, at most T), and its output is scaled by that probability; a token may be
picked by several experts or by none (`last_unrouted` is the fraction no expert picked). Loads
are balanced by construction: no balance loss.

Causality caveat: expert choice ranks every token of the micro-batch, future positions
included, so in training the output at position t depends on tokens after t (and on the other
sequences of the batch). It is a training-time routing only: in eval mode (`module.eval()`)
the same router routes by top-1 token choice (probability-scaled, as above), which is causal,
the way the paper evaluates its expert-choice MoE baseline. Set `eval_routing_in_training=True`
to train with the eval routing as well.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.feedforward import SwiGLU
from memlayers.models.init import trunc_normal_

ROUTINGS = ("token_choice", "expert_choice")


def expert_capacity(tokens: int, experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: capacity_factor * T / E, floored, in [1, T]."""
    return min(tokens, max(1, int(capacity_factor * tokens / experts)))


class MoE(nn.Module):
    def __init__(self, dim: int, expert_hidden_dim: int, experts: int, topk: int, shared_hidden_dim: int | None,
                 routing: str = "token_choice", capacity_factor: float = 1.0) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing: must be one of {ROUTINGS}, got {routing!r}")
        self.experts, self.topk, self.routing, self.capacity_factor = experts, topk, routing, capacity_factor
        self.eval_routing_in_training = False
        self.router = nn.Linear(dim, experts, bias=False)
        self.w1_EDF = nn.Parameter(torch.empty(experts, dim, expert_hidden_dim))
        self.w3_EDF = nn.Parameter(torch.empty(experts, dim, expert_hidden_dim))
        self.w2_EFD = nn.Parameter(torch.empty(experts, expert_hidden_dim, dim))
        self.shared = SwiGLU(dim, shared_hidden_dim) if shared_hidden_dim else None
        self.balance_loss = torch.zeros(())
        self.last_load_E = torch.zeros(experts)
        self.last_unrouted = torch.zeros(())  # fraction of tokens no expert picked (expert choice)

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.router.weight, std)
        trunc_normal_(self.w1_EDF, std)
        trunc_normal_(self.w3_EDF, std)
        trunc_normal_(self.w2_EFD, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)

    @property
    def expert_choice_now(self) -> bool:
        """Whether this forward routes by expert choice (training, unless told otherwise)."""
        return self.routing == "expert_choice" and self.training and not self.eval_routing_in_training

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        if self.expert_choice_now:
            out_TD = self._expert_choice(x_TD, probs_TE)
        else:
            out_TD = self._token_choice(x_TD, probs_TE, 1 if self.routing == "expert_choice" else self.topk)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view_as(x_BSD)

    def _token_choice(self, x_TD: torch.Tensor, probs_TE: torch.Tensor, topk: int) -> torch.Tensor:
        gate_TK, expert_TK = probs_TE.topk(topk, dim=-1)
        if topk > 1:  # at top-1 a renormalised gate would be 1: keep the probability (Switch)
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
        expert_L = expert_TK.reshape(-1)
        order_L = torch.argsort(expert_L, stable=True)
        token_L = order_L // topk
        counts_E = torch.bincount(expert_L, minlength=self.experts)
        out_TD = torch.zeros_like(x_TD)
        start = 0
        for e, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            tokens_C = token_L[start:start + count]
            x_CD = x_TD[tokens_C]
            h_CF = F.silu(x_CD @ self.w1_EDF[e]) * (x_CD @ self.w3_EDF[e])
            y_CD = (h_CF @ self.w2_EFD[e]) * gate_TK.reshape(-1)[order_L[start:start + count], None].to(x_CD.dtype)
            out_TD = out_TD.index_add(0, tokens_C, y_CD)
            start += count
        load_E = counts_E.float() / max(1, expert_L.numel())
        self.last_load_E = load_E.detach()
        self.last_unrouted = torch.zeros(())
        self.balance_loss = self.experts * (load_E * probs_TE.mean(0)).sum()
        return out_TD

    def _expert_choice(self, x_TD: torch.Tensor, probs_TE: torch.Tensor) -> torch.Tensor:
        capacity = expert_capacity(x_TD.shape[0], self.experts, self.capacity_factor)
        gate_EC, token_EC = probs_TE.t().topk(capacity, dim=-1)   # each expert's best tokens
        x_ECD = x_TD[token_EC]
        h_ECF = F.silu(torch.bmm(x_ECD, self.w1_EDF)) * torch.bmm(x_ECD, self.w3_EDF)
        y_ECD = torch.bmm(h_ECF, self.w2_EFD) * gate_EC[..., None].to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add(0, token_EC.reshape(-1), y_ECD.reshape(-1, x_TD.shape[1]))
        picked_T = torch.zeros(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
        picked_T[token_EC.reshape(-1)] = True
        self.last_load_E = torch.full((self.experts,), 1.0 / self.experts)
        self.last_unrouted = 1.0 - picked_T.float().mean()
        self.balance_loss = torch.zeros((), device=x_TD.device)
        return out_TD


def load_imbalance(load_E: torch.Tensor) -> float:
    """max load / uniform load (1.0 is perfectly balanced)."""
    return float(load_E.max() * load_E.numel()) if load_E.numel() else math.nan
