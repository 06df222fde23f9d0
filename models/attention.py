"""Causal self-attention with rotary position embeddings and optional grouped KV heads.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.init import trunc_normal_
from memlayers.models.kv_cache import LayerKV


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim/2) for rotary embeddings."""
    freqs_Y = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions_S = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles_SY = torch.outer(positions_S, freqs_Y)
    return angles_SY.cos(), angles_SY.sin()


def apply_rope(x_BSHA: torch.Tensor, cos_SY: torch.Tensor, sin_SY: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by position-dependent angles: the first S rows of the tables,
    or tables already gathered per token, (B, S, Y), for decoding with a cache."""
    S = x_BSHA.shape[1]
    x_even, x_odd = x_BSHA.float()[..., 0::2], x_BSHA.float()[..., 1::2]
    if cos_SY.dim() == 3:
        cos, sin = cos_SY[:, :, None, :], sin_SY[:, :, None, :]
    else:
        cos, sin = cos_SY[:S, None, :], sin_SY[:S, None, :]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_BSHA)


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

    def forward(self, x_BSD: torch.Tensor, cos_SY: torch.Tensor, sin_SY: torch.Tensor,
                cache: LayerKV | None = None, mask_BSZ: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention over the S tokens; with `cache` (and its mask) over every cached one too."""
        B, S, _ = x_BSD.shape
        q_BSHA = apply_rope(self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim), cos_SY, sin_SY)
        k_BSGA = apply_rope(self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim), cos_SY, sin_SY)
        v_BSGA = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        k_BGZA, v_BGZA = k_BSGA.transpose(1, 2), v_BSGA.transpose(1, 2)
        if cache is not None:
            k_BGZA, v_BGZA = cache.update(k_BGZA, v_BGZA)
        out_BHSA = F.scaled_dot_product_attention(
            q_BSHA.transpose(1, 2), k_BGZA, v_BGZA, is_causal=cache is None,
            attn_mask=None if cache is None else mask_BSZ[:, None], enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out_BHSA.transpose(1, 2).reshape(B, S, -1))
