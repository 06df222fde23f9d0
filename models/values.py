"""The value table of a memory: N rows of dimension V, read by an embedding bag.

The table is a module of its own so that a model can own one table and hand it to several
memory layers (Memory+ shares one table across its layers), and so that a sharded table
(memory parallelism) can stand in for it with the same `forward(slots, weights)`.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch
from torch import nn

from memlayers.kernels.lookup import embedding_bag


class ValueTable(nn.Module):
    def __init__(self, slots: int, value_dim: int, sparse_grad: bool = True) -> None:
        super().__init__()
        self.slots, self.value_dim, self.sparse_grad = slots, value_dim, sparse_grad
        self.weight = nn.Parameter(torch.empty(slots, value_dim))

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, std=self.value_dim ** -0.5)

    def forward(self, slots_TR: torch.Tensor, weights_TR: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the rows `slots_TR` -> (T, V)."""
        return embedding_bag(self.weight, slots_TR, weights_TR, sparse_grad=self.sparse_grad)

    def extra_repr(self) -> str:
        return f"slots={self.slots}, value_dim={self.value_dim}, sparse_grad={self.sparse_grad}"
