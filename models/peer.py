"""PEER (He 2024, "Mixture of A Million Experts"): product-key retrieval of single-neuron experts.

Expert i of N = n*n is one hidden neuron with a down vector u_i and an up vector v_i, both of
model dim D. Per token and head, the product-key search (`memlayers.models.product_keys`)
retrieves the top-k experts; the output sums over heads and retrieved experts:

    out = sum_h sum_{i in top-k(h)} norm(s_hi) * act(x . u_i) * v_i

The paper defines the router weights as a softmax or a sigmoid of the k retrieved scores and
act as a non-linearity such as ReLU or GELU, without fixing one; we default to the softmax over
each head's k scores (as the memory layers here do, so a head's weights sum to 1) and GELU
(`peer.score_norm`, `peer.activation` choose the others). The paper's query batch norm is
replaced by the optional qk-norm of the memory layers (batch statistics would mix tokens).

Both tables are `ValueTable`s read through the lookup ops of `memlayers.kernels.lookup`:
x . u_i by `row_dot`, the weighted sum of the v_i by `embedding_bag`; so the expert rows get
row-sparse gradients and the model lists them with its value tables (`value_parameters`),
where the value optimizers (lazy_adam, row_adagrad, adamw) treat them like memory values.
The tables are the layer's own, or a pair owned by the model and shared by its PEER layers
(held by reference, as a shared memory value table is).

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memlayers.kernels.lookup import row_dot
from memlayers.models.config import PeerConfig, default_key_dim
from memlayers.models.product_keys import ProductKeySearch
from memlayers.models.values import ValueTable

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def expert_tables(cfg: PeerConfig, dim: int) -> tuple[ValueTable, ValueTable]:
    """A fresh (down, up) pair of expert tables, N x D each."""
    return (ValueTable(cfg.experts, dim, sparse_grad=cfg.sparse_grad),
            ValueTable(cfg.experts, dim, sparse_grad=cfg.sparse_grad))


class PeerLayer(ProductKeySearch):
    def __init__(self, dim: int, cfg: PeerConfig, tables: tuple[ValueTable, ValueTable] | None = None) -> None:
        super().__init__(dim, cfg.heads, cfg.sub_keys, cfg.topk, cfg.key_dim or default_key_dim(dim),
                         qk_norm=cfg.qk_norm, temperature=cfg.temperature)
        self.activation, self.score_norm = ACTIVATIONS[cfg.activation], cfg.score_norm
        if tables is None:
            self.down, self.up = expert_tables(cfg, dim)
            self._shared_tables: list[ValueTable] = []
        else:
            self._shared_tables = list(tables)
        self.last_experts_TR: torch.Tensor | None = None

    def tables(self) -> tuple[ValueTable, ValueTable]:
        """(down, up): the u_i and v_i rows."""
        if self._shared_tables:
            return self._shared_tables[0], self._shared_tables[1]
        return self.down, self.up

    def init_weights(self, std: float, out_std: float) -> None:
        self.init_keys(std)
        if not self._shared_tables:
            self.down.init_weights()
            self.up.init_weights()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        scores_THK, experts_THK = self.search(x_TD)
        if self.score_norm == "softmax":
            gates_THK = F.softmax(scores_THK, dim=-1)
        else:
            gates_THK = torch.sigmoid(scores_THK)
        experts_TR = experts_THK.flatten(1)
        self.last_experts_TR = experts_TR.detach()
        down, up = self.tables()
        hidden_TR = self.activation(row_dot(down.weight, experts_TR, x_TD, sparse_grad=down.sparse_grad))
        out_TD = up(experts_TR, gates_THK.flatten(1) * hidden_TR)
        return out_TD.view_as(x_BSD).to(x_BSD.dtype)
