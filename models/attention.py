"""Causal self-attention with rotary position embeddings and optional grouped KV heads.

Legend: B batch, T sequence, D model dim, H query heads, G kv heads, E head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.init import trunc_normal_


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2) for rotary embeddings."""
    freqs_E2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions_T = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles_TE2 = torch.outer(positions_T, freqs_E2)
    return angles_TE2.cos(), angles_TE2.sin()


def apply_rope(x_BTHE: torch.Tensor, cos_TE2: torch.Tensor, sin_TE2: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles."""
    T = x_BTHE.shape[1]
    x_even, x_odd = x_BTHE.float()[..., 0::2], x_BTHE.float()[..., 1::2]
    cos, sin = cos_TE2[:T, None, :], sin_TE2[:T, None, :]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_BTHE)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            trunc_normal_(linear.weight, std)
        trunc_normal_(self.wo.weight, out_std)

    def forward(self, x_BTD: torch.Tensor, cos_TE2: torch.Tensor, sin_TE2: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHE = apply_rope(self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim), cos_TE2, sin_TE2)
        k_BTGE = apply_rope(self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim), cos_TE2, sin_TE2)
        v_BTGE = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)
        out_BHTE = F.scaled_dot_product_attention(
            q_BTHE.transpose(1, 2), k_BTGE.transpose(1, 2), v_BTGE.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out_BHTE.transpose(1, 2).reshape(B, T, -1))
