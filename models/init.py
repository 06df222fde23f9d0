"""Weight initialisation helpers shared by the model's modules (every parameter is set on purpose)."""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at 3 std."""
    nn.init.trunc_normal_(weight, std=std, a=-3 * std, b=3 * std)
