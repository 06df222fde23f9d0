"""Exact parameter and FLOP accounting from a config, without building the model.

Parameters are counted by kind: embedding (input table + untied output head), memory values
(every distinct row table: memory value tables and PEER's down/up expert tables, reported in
`memory_value_params`), the rest, and *active* parameters — those a token uses: all
non-value, non-expert parameters, the top-k experts' share of each MoE layer (under expert
choice: capacity_factor experts per token on average, the training routing), and the rows a
memory layer reads (heads * topk * value_dim per memory layer) or a PEER layer retrieves
(heads * topk * 2 * D: each expert's u_i and v_i).

Forward FLOPs per token count 2 per multiply-add of every matmul (letters as in docs/shapes.md):
  attention projections 2*D*(H*A) + 2*2*D*(G*A) + 2*(H*A)*D, attention mixing 2*2*(H*A)*ctx
  with ctx = (seq_len + 1) / 2 (the mean causal context), SwiGLU 2*3*D*F, MoE router 2*D*E
  plus topk experts 2*3*D*F (plus a shared expert), memory layer: query 2*D*H*2Q,
  sub-key scoring 2*H*n*2Q, value read 2*H*K*V, Memory+ gate and output 2*D*V each; PEER
  layer: query and scoring as a memory layer, x . u_i 2*H*K*D and the weighted sum of the v_i
  2*H*K*D; the output head 2*D*W. A value table adds N*V parameters (a PEER table pair
  2*N*D) and NO FLOPs beyond the rows read.
  Norms, rotary embeddings, softmaxes and top-k selection are not counted.
Training FLOPs = 3 x forward FLOPs (forward + backward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memlayers.models.config import ModelConfig


@dataclass(frozen=True)
class Accounting:
    total_params: int
    embedding_params: int
    memory_value_params: int
    active_params: int
    forward_flops_per_token: int
    train_flops_per_token: int

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    def as_dict(self) -> dict:
        return {**asdict(self), "non_embedding_params": self.non_embedding_params}


@dataclass(frozen=True)
class _Counts:
    params: int = 0
    active: int = 0
    flops: int = 0

    def __add__(self, other: "_Counts") -> "_Counts":
        return _Counts(self.params + other.params, self.active + other.active, self.flops + other.flops)


def _dense(d: int, f: int) -> _Counts:
    return _Counts(3 * d * f, 3 * d * f, 2 * 3 * d * f)


def _attention(cfg: ModelConfig, seq_len: int) -> _Counts:
    d, qe, kve = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    params = d * qe + 2 * d * kve + qe * d
    mixing = 2 * 2 * qe * (seq_len + 1) // 2
    return _Counts(params, params, 2 * params + mixing)


def _moe(cfg: ModelConfig) -> _Counts:
    d, moe, fe = cfg.dim, cfg.moe, cfg.expert_hidden_dim
    expert = _dense(d, fe)
    per_token = moe.experts_per_token   # topk, or capacity_factor on average under expert choice
    counts = _Counts(d * moe.experts, d * moe.experts, 2 * d * moe.experts)
    counts += _Counts(moe.experts * expert.params, round(per_token * expert.active), round(per_token * expert.flops))
    return counts + (_dense(d, cfg.hidden_dim) if moe.shared_expert else _Counts())


def _memory_layer(cfg: ModelConfig) -> _Counts:
    """A memory layer without its value table (the table is counted once per distinct table)."""
    d, mem, kd, v = cfg.dim, cfg.memory, cfg.key_dim, cfg.dim
    params = d * mem.heads * kd + mem.heads * mem.sub_keys * kd + (kd // 2 if cfg.qk_norm else 0)
    flops = 2 * d * mem.heads * kd + 2 * mem.heads * mem.sub_keys * kd + 2 * mem.heads * mem.topk * v
    if cfg.gated:
        params += 2 * d * v
        flops += 2 * d * v + 2 * v * d
    return _Counts(params, params + mem.heads * mem.topk * v, flops)


def _peer_layer(cfg: ModelConfig) -> _Counts:
    """A PEER layer without its expert tables (counted once per distinct table pair)."""
    d, peer, kd = cfg.dim, cfg.peer, cfg.key_dim
    reads = peer.heads * peer.topk
    params = d * peer.heads * kd + peer.heads * peer.sub_keys * kd + (kd // 2 if peer.qk_norm else 0)
    # query, sub-key scoring, x . u_i for the retrieved experts, the weighted sum of their v_i
    flops = 2 * d * peer.heads * kd + 2 * peer.heads * peer.sub_keys * kd + 2 * reads * d + 2 * reads * d
    return _Counts(params, params + reads * 2 * d, flops)


_FFN_COUNTS = {"moe": _moe, "memory": _memory_layer, "peer": _peer_layer}


def memory_value_params(cfg: ModelConfig) -> int:
    """Parameters of every distinct row table: memory values, or PEER's down and up expert tables."""
    if cfg.peer_layers:
        pairs = 1 if cfg.peer.shared_tables else len(cfg.peer_layers)
        return pairs * 2 * cfg.peer.experts * cfg.dim
    if not cfg.memory_layers:
        return 0
    tables = 1 if cfg.shared_values else len(cfg.memory_layers)
    return tables * cfg.memory.slots * cfg.dim


def account(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    """Parameters by kind and FLOPs per token of `cfg` at `seq_len` (default max_seq_len)."""
    cfg.validate()
    seq_len = seq_len or cfg.max_seq_len
    d = cfg.dim
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    body = _Counts()
    for layer in range(cfg.n_layers):
        body += _attention(cfg, seq_len) + _Counts(2 * d, 2 * d, 0)
        kind = cfg.ffn_kind(layer)
        body += _FFN_COUNTS[kind](cfg) if kind in _FFN_COUNTS else _dense(d, cfg.hidden_dim)
    head_flops = 2 * d * cfg.vocab_size
    values = memory_value_params(cfg)
    total = embedding + body.params + d + values
    active = embedding + body.active + d
    forward = body.flops + head_flops
    return Accounting(total, embedding, values, active, forward, 3 * forward)
