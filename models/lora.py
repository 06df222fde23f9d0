"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's nn.Linear projections.

`add_lora(model, targets, rank, alpha)` replaces every nn.Linear held under one of the attribute
names `targets` (e.g. the attention's wq/wk/wv/wo and the SwiGLU's w1/w2/w3) by a `LoRALinear`:
the frozen projection plus `scale * B A x` with A (rank x in) and B (out x rank), B starting at
zero so that the adapted model computes what the original did. `merge_lora(model)` folds each
adapter back into a plain nn.Linear (W + scale * B A) for inference or export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing base + adapter."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + self.scale * (self.lora_b @ self.lora_a).to(self.base.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, cls: type, names: tuple[str, ...] | list[str]):
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in names and type(child) is cls:
                yield module, name, child


def add_lora(model: nn.Module, targets: tuple[str, ...] | list[str], rank: int, alpha: float) -> list[LoRALinear]:
    """Wrap the targeted projections in place; returns the adapters (their A and B are the only new parameters)."""
    adapters = []
    for parent, name, linear in _targets(model, nn.Linear, targets):
        adapter = LoRALinear(linear, rank, alpha)
        setattr(parent, name, adapter)
        adapters.append(adapter)
    if not adapters:
        raise ValueError(f"lora: no nn.Linear named {', '.join(targets)} in the model")
    return adapters


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged nn.Linear (in place); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model
