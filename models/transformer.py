"""The Llama-style decoder: pre-norm blocks of attention + a per-layer feed-forward.

The feed-forward of layer i is SwiGLU, MoE, a memory layer or a PEER layer, as
`ModelConfig.ffn_kind(i)` says. With `memory.shared_values` (the default of memory_plus) the
model owns ONE value table that its memory layers share; with `peer.shared_tables` it owns one
pair of expert tables that its PEER layers share.

`value_tables()` lists every distinct row table (memory values and PEER expert tables alike)
and `value_parameters()` their weights: the parameters that get row-sparse gradients and the
value optimizer.

Shape suffixes: see docs/shapes.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memlayers.models.attention import Attention, rope_tables
from memlayers.models.config import ModelConfig
from memlayers.models.feedforward import SwiGLU
from memlayers.models.init import trunc_normal_
from memlayers.models.kv_cache import KVCache, LayerKV
from memlayers.models.memory import MemoryLayer
from memlayers.models.moe import MoE
from memlayers.models.peer import PeerLayer, expert_tables
from memlayers.models.values import ValueTable

SharedTables = dict[str, object]  # "values": ValueTable | None, "peer": (down, up) | None


def build_ffn(cfg: ModelConfig, layer: int, shared: SharedTables) -> nn.Module:
    kind = cfg.ffn_kind(layer)
    if kind == "moe":
        moe = cfg.moe
        return MoE(cfg.dim, cfg.expert_hidden_dim, moe.experts, moe.topk,
                   cfg.hidden_dim if moe.shared_expert else None, moe.routing, moe.capacity_factor)
    if kind == "memory":
        return MemoryLayer(cfg.dim, cfg.memory, shared["values"], key_dim=cfg.key_dim,
                           qk_norm=cfg.qk_norm, gated=cfg.gated)
    if kind == "peer":
        return PeerLayer(cfg.dim, cfg.peer, shared["peer"])
    return SwiGLU(cfg.dim, cfg.hidden_dim)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, shared: SharedTables) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg, layer, shared)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKV | None = None, mask_BSZ: torch.Tensor | None = None) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos, sin, cache, mask_BSZ)
        return h_BSD + self.ffn(self.ffn_norm(h_BSD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.memory_values = None
        if cfg.memory_layers and cfg.shared_values:
            self.memory_values = ValueTable(cfg.memory.slots, cfg.dim, sparse_grad=cfg.memory.sparse_grad)
        self.peer_down = self.peer_up = None
        if cfg.peer_layers and cfg.peer.shared_tables:
            self.peer_down, self.peer_up = expert_tables(cfg.peer, cfg.dim)
        shared = {"values": self.memory_values,
                  "peer": (self.peer_down, self.peer_up) if self.peer_down is not None else None}
        self.layers = nn.ModuleList(Block(cfg, i, shared) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        trunc_normal_(self.tok_embeddings.weight, 1.0 if self.output is not None else std)
        if self.output is not None:
            trunc_normal_(self.output.weight, cfg.dim ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.layers:
            block.attention.init_weights(std, out_std)
            block.ffn.init_weights(std, out_std)
        for table in (self.memory_values, self.peer_down, self.peer_up):
            if table is not None:
                table.init_weights()
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (B, S, W), fp32. With `cache` (decoding), the S tokens follow the
        cached ones, take their rotary positions from it, and are added to it."""
        h_BSD = self.tok_embeddings(tokens_BS)
        cos, sin, mask_BSZ = self.rope_cos, self.rope_sin, None
        if cache is not None:
            positions_BS, mask_BSZ = cache.positions_BS(tokens_BS.shape[1]), cache.mask_BSZ(tokens_BS.shape[1])
            cos, sin = self.rope_cos[positions_BS], self.rope_sin[positions_BS]
        for i, block in enumerate(self.layers):
            h_BSD = block(h_BSD, cos, sin, None if cache is None else cache.layer(i), mask_BSZ)
        if cache is not None:
            cache.advance(tokens_BS.shape[1])
        h_BSD = self.norm(h_BSD)
        weight_WD = self.output.weight if self.output is not None else self.tok_embeddings.weight
        return F.linear(h_BSD, weight_WD).float()

    def new_cache(self, pad_B: torch.Tensor, capacity: int) -> KVCache:
        """An empty key/value cache for rows left-padded by `pad_B`, `capacity` positions each."""
        cfg = self.cfg
        if capacity > cfg.max_seq_len:
            raise ValueError(f"kv cache: {capacity} positions exceed max_seq_len {cfg.max_seq_len}")
        return KVCache(cfg.n_layers, pad_B, capacity, cfg.kv_heads, cfg.head_dim, self.tok_embeddings.weight.dtype)

    def loss(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss for the optimizer, cross-entropy alone); total adds MoE balance loss."""
        logits_BSW = self(tokens_BS)
        ce = F.cross_entropy(logits_BSW.flatten(0, 1), targets_BS.flatten(), ignore_index=-100)
        return ce + self.aux_loss(), ce

    def aux_loss(self) -> torch.Tensor:
        moes = self.moe_layers()
        if not moes:
            return torch.zeros((), device=self.tok_embeddings.weight.device)
        return self.cfg.moe.balance_coef * sum(m.balance_loss for m in moes)

    # ---- structure ----------------------------------------------------------------------------
    def memory_layers(self) -> list[MemoryLayer]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MemoryLayer)]

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def peer_layers(self) -> list[PeerLayer]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, PeerLayer)]

    def table_reads(self) -> list[tuple[ValueTable, torch.Tensor | None]]:
        """(table, rows the last forward read from it) for every read of a row table, layer by layer."""
        reads: list[tuple[ValueTable, torch.Tensor | None]] = [(m.table, m.last_slots_TR) for m in self.memory_layers()]
        for layer in self.peer_layers():
            reads += [(table, layer.last_experts_TR) for table in layer.tables()]
        return reads

    def value_tables(self) -> list[ValueTable]:
        """Distinct row tables: memory values (one for memory_plus, one per layer for pkm) and PEER
        expert tables (down and up, per layer or one shared pair)."""
        tables: dict[int, ValueTable] = {}
        for table, _ in self.table_reads():
            tables.setdefault(id(table), table)
        return list(tables.values())

    def value_parameters(self) -> list[nn.Parameter]:
        return [t.weight for t in self.value_tables()]
