"""Product-key memory layers: Lample et al.'s PKM and the paper's Memory+.

The layer searches its product keys (`memlayers.models.product_keys`) for the top-k rows per
head, weights them by an fp32 softmax over the k scores, and reads them with an embedding bag
over the value table (summed over heads and rows).

- pkm:          out = y
- memory_plus:  qk-norm search, then out = W_o(y * silu(W_g x)).

The table is either the layer's own (`values=None`) or a table owned by the model and shared
with other layers: a shared table is held by reference, not registered as a sub-module, so its
parameter appears once in the model.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.config import MemoryConfig, default_key_dim
from memlayers.models.init import trunc_normal_
from memlayers.models.product_keys import ProductKeySearch
from memlayers.models.values import ValueTable


class MemoryLayer(ProductKeySearch):
    def __init__(self, dim: int, cfg: MemoryConfig, values: ValueTable | None = None, *,
                 key_dim: int | None = None, qk_norm: bool = True, gated: bool = True) -> None:
        super().__init__(dim, cfg.heads, cfg.sub_keys, cfg.topk, key_dim or cfg.key_dim or default_key_dim(dim),
                         qk_norm=qk_norm, temperature=cfg.temperature)
        self.gated = gated
        if values is None:
            self.values = ValueTable(cfg.slots, dim, sparse_grad=cfg.sparse_grad)
            self._shared_values: list[ValueTable] = []
        else:
            self._shared_values = [values]
        value_dim = self.table.value_dim
        if gated:
            self.gate = nn.Linear(dim, value_dim, bias=False)
            self.out = nn.Linear(value_dim, dim, bias=False)
        self.last_slots_TR: torch.Tensor | None = None

    @property
    def table(self) -> ValueTable:
        return self._shared_values[0] if self._shared_values else self.values

    @property
    def last_slots_TK(self) -> torch.Tensor | None:
        """Deprecated name of `last_slots_TR` (the slots the last forward read, (T, heads * topk))."""
        return self.last_slots_TR

    def init_weights(self, std: float, out_std: float) -> None:
        """Keys and query at the model's `std`; the swilu gate and output at fan-in^-1/2, as the
        reference code initialises them. Why not the model's 0.02 / out_std: the layer's output is
        W_o(y * silu(W_g x)) with y a softmax-mix of unit-norm value rows, so a gate at 0.02 makes
        silu(W_g x) ~ 0.1 x smaller than at fan-in^-1/2 and W_o at out_std another ~10x: at dim 32
        the memory's output started ~300x below PKM's and its value rows got ~370x less gradient,
        which delays when the memory starts to learn facts (measured in the quickstart's regime).
        At fan-in^-1/2 both projections keep unit scale, like a dense FFN's first layer."""
        self.init_keys(std)
        if self.gated:
            trunc_normal_(self.gate.weight, self.gate.in_features ** -0.5)
            trunc_normal_(self.out.weight, self.out.in_features ** -0.5)
        if not self._shared_values:
            self.values.init_weights()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        scores_THK, slots_THK = self.search(x_TD)
        weights_THK = F.softmax(scores_THK, dim=-1)
        slots_TR = slots_THK.flatten(1)
        self.last_slots_TR = slots_TR.detach()
        y_TV = self.table(slots_TR, weights_THK.flatten(1))
        out_TD = self.out(y_TV * F.silu(self.gate(x_TD)).to(y_TV.dtype)) if self.gated else y_TV
        return out_TD.view_as(x_BSD).to(x_BSD.dtype)
