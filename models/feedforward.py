"""SwiGLU feed-forward: w2(silu(w1 x) * w3 x), the Llama FFN and the MoE expert shape.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.init import trunc_normal_


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        trunc_normal_(self.w1.weight, std)
        trunc_normal_(self.w3.weight, std)
        trunc_normal_(self.w2.weight, out_std)

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_D)) * self.w3(x_D))
