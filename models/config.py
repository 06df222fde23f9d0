"""Model configs: the transformer shape and the feed-forward family with its options.

Families (listed, with what each takes, in `memlayers.models.families`): `dense` (SwiGLU
everywhere), `moe` (every FFN a mixture of experts), `pkm` (product-key memory replacing the
FFN in chosen layers, own values per layer), `memory_plus` (the paper's layer: qk-norm,
swilu gating, several layers sharing ONE value table) and `peer` (product-key retrieval of
single-neuron experts replacing the FFN in chosen layers).
All configs validate on construction through `validate(path)`; errors name the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from memlayers.config_schema import ConfigError, require
from memlayers.models.families import FAMILIES, MEMORY_FAMILIES, MEMORY_PARALLEL_FAMILIES, Family, family_spec

__all__ = ["FAMILIES", "MEMORY_FAMILIES", "MEMORY_PARALLEL_FAMILIES", "Family", "MemoryConfig", "MoEConfig",
           "ModelConfig", "PeerConfig", "default_key_dim"]


SECTIONS = ("memory", "moe", "peer")  # the optional family sections of a ModelConfig


def default_key_dim(dim: int) -> int:
    """The default full key dim of a product-key query: the largest even number <= dim / 4 (at least 2)."""
    return max(2, 2 * (dim // 8))


# Bounds on table sizes a config may ask for (far above the paper's 4096^2 memory and 768^2 PEER
# experts), so that validating any config answers at once instead of sizing an impossible model.
MAX_ROWS = 2**32
MAX_EXPERTS = 65536


def _check_product_keys(cfg, rows_field: str, path: str) -> None:
    """The checks a product-key search's config shares (memory layers and PEER): N = n^2 rows,
    bounded; heads; top-k within the n sub-keys; an even key dim; a positive temperature."""
    rows = getattr(cfg, rows_field)
    require(rows > 0 and math.isqrt(rows) ** 2 == rows, f"{path}.{rows_field}",
            f"must be a perfect square n*n (product keys), got {rows}")
    require(rows <= MAX_ROWS, f"{path}.{rows_field}", f"at most {MAX_ROWS:,} (65536^2), got {rows:,}")
    require(cfg.heads >= 1, f"{path}.heads", f"must be >= 1, got {cfg.heads}")
    require(1 <= cfg.topk <= cfg.sub_keys, f"{path}.topk",
            f"must be between 1 and sqrt({rows_field})={cfg.sub_keys}, got {cfg.topk}")
    if cfg.key_dim is not None:
        require(cfg.key_dim >= 2 and cfg.key_dim % 2 == 0, f"{path}.key_dim",
                f"must be an even integer >= 2, got {cfg.key_dim}")
    if cfg.temperature is not None:
        require(cfg.temperature > 0, f"{path}.temperature", f"must be > 0, got {cfg.temperature}")

@dataclass
class MemoryConfig:
    slots: int = 65536            # N = n^2 value rows; n sub-keys per half
    heads: int = 4                # query heads, each reads `topk` rows
    topk: int = 32                # rows read per head per token
    key_dim: Optional[int] = None  # full key dim 2Q (two halves of Q); None -> default_key_dim(dim)
    n_layers: Optional[int] = None  # memory layers; None -> 3 (memory_plus) or 1 (pkm)
    layers: Optional[list[int]] = None  # explicit layer indices; None -> evenly spaced
    qk_norm: Optional[bool] = None  # None -> True for memory_plus, False for pkm
    gated: Optional[bool] = None    # swilu gate + output projection; None -> as qk_norm
    shared_values: Optional[bool] = None  # one table for all memory layers; None -> True for memory_plus only
    sparse_grad: bool = True      # row-sparse value gradients (False: paper-faithful dense)
    temperature: Optional[float] = None  # qk-norm score scale on cosines; None -> sqrt(key_dim/2)

    @property
    def sub_keys(self) -> int:
        return math.isqrt(self.slots)

    def validate(self, path: str = "memory") -> None:
        _check_product_keys(self, "slots", path)
        if self.n_layers is not None:
            require(self.n_layers >= 1, f"{path}.n_layers", f"must be >= 1, got {self.n_layers}")


@dataclass
class MoEConfig:
    experts: int = 8              # E experts per MoE layer
    topk: int = 2                 # experts per token under token choice (expert choice: unused)
    expert_ffn_dim: Optional[int] = None  # None -> ffn_dim / experts per token (active FLOPs ~ dense)
    shared_expert: bool = False   # an always-on SwiGLU beside the routed experts
    balance_coef: float = 0.01    # Switch load-balancing loss weight (token choice)
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    """token_choice: each token picks `topk` experts (dropless). expert_choice: in training each
    expert picks its capacity_factor * T / E best tokens of the micro-batch (not causal); in eval
    mode the same router routes top-1 token choice (see memlayers.models.moe)."""
    capacity_factor: float = 1.0
    """expert choice: experts per token on average (each expert takes capacity_factor * T / E tokens)."""

    @property
    def experts_per_token(self) -> float:
        """Experts a token runs through in training: topk, or capacity_factor on average."""
        return self.capacity_factor if self.routing == "expert_choice" else self.topk

    def validate(self, path: str = "moe") -> None:
        require(1 <= self.experts <= MAX_EXPERTS, f"{path}.experts",
                f"must be in [1, {MAX_EXPERTS}], got {self.experts}")
        require(1 <= self.topk <= self.experts, f"{path}.topk",
                f"must be between 1 and experts={self.experts}, got {self.topk}")
        if self.expert_ffn_dim is not None:
            require(self.expert_ffn_dim >= 1, f"{path}.expert_ffn_dim", f"must be >= 1, got {self.expert_ffn_dim}")
        require(self.balance_coef >= 0, f"{path}.balance_coef", f"must be >= 0, got {self.balance_coef}")
        require(self.routing in ("token_choice", "expert_choice"), f"{path}.routing",
                f"must be token_choice or expert_choice, got {self.routing!r}")
        require(self.capacity_factor > 0, f"{path}.capacity_factor", f"must be > 0, got {self.capacity_factor}")
        require(self.capacity_factor <= self.experts, f"{path}.capacity_factor",
                f"must be at most experts={self.experts} (each token at most once per expert), "
                f"got {self.capacity_factor}")


@dataclass
class PeerConfig:
    """PEER (He 2024, "Mixture of A Million Experts"): product-key retrieval of single-neuron experts."""

    experts: int = 65536          # N = n^2 experts, each a down vector u_i and an up vector v_i of dim D
    heads: int = 8                # retrieval heads, each retrieves `topk` experts
    topk: int = 16                # experts per head per token
    key_dim: Optional[int] = None  # full key dim 2Q; None -> default_key_dim(dim)
    activation: Literal["gelu", "relu"] = "gelu"   # act in act(x . u_i) (the paper: ReLU or GELU)
    score_norm: Literal["softmax", "sigmoid"] = "softmax"  # over a head's k scores (the paper: either)
    n_layers: Optional[int] = None  # PEER layers replacing the FFN; None -> 1
    layers: Optional[list[int]] = None  # explicit layer indices; None -> evenly spaced
    shared_tables: bool = False   # one (u, v) table pair for all PEER layers, owned by the model
    qk_norm: bool = False         # RMS-normalised query halves and sub-keys (as Memory+)
    temperature: Optional[float] = None  # qk-norm score scale on cosines; None -> sqrt(key_dim/2)
    sparse_grad: bool = True      # row-sparse expert-table gradients (False: dense)

    @property
    def sub_keys(self) -> int:
        return math.isqrt(self.experts)

    def validate(self, path: str = "peer") -> None:
        _check_product_keys(self, "experts", path)
        require(self.activation in ("gelu", "relu"), f"{path}.activation",
                f"must be gelu or relu, got {self.activation!r}")
        require(self.score_norm in ("softmax", "sigmoid"), f"{path}.score_norm",
                f"must be softmax or sigmoid, got {self.score_norm!r}")
        if self.n_layers is not None:
            require(self.n_layers >= 1, f"{path}.n_layers", f"must be >= 1, got {self.n_layers}")


def evenly_spaced(count: int, n_layers: int) -> list[int]:
    """`count` layer indices spread evenly over `n_layers` (never the first)."""
    return [(i + 1) * n_layers // (count + 1) for i in range(count)]


@dataclass
class ModelConfig:
    family: Family = "dense"
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped KV heads; None -> n_heads
    ffn_dim: Optional[int] = None     # None -> Llama rule: 8/3 * dim rounded up to ffn_multiple
    ffn_multiple: int = 16
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    memory: Optional[MemoryConfig] = None
    moe: Optional[MoEConfig] = None
    peer: Optional[PeerConfig] = None

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        raw = int(8 * self.dim / 3)
        return self.ffn_multiple * math.ceil(raw / self.ffn_multiple)

    @property
    def expert_hidden_dim(self) -> int:
        assert self.moe is not None
        if self.moe.expert_ffn_dim:
            return self.moe.expert_ffn_dim
        if self.moe.routing == "expert_choice":
            return max(1, int(self.hidden_dim / self.moe.capacity_factor))
        return max(1, self.hidden_dim // self.moe.topk)

    @property
    def key_dim(self) -> int:
        """Full key dim of the product keys (memory or PEER)."""
        section = self.memory if self.memory is not None else self.peer
        assert section is not None
        return section.key_dim or default_key_dim(self.dim)

    @property
    def memory_size(self) -> int:
        """Rows of the family's tables: memory slots, PEER experts, 0 for dense and moe."""
        if self.memory is not None:
            return self.memory.slots
        return self.peer.experts if self.peer is not None else 0

    @property
    def memory_plus(self) -> bool:
        return self.family == "memory_plus"

    @property
    def qk_norm(self) -> bool:
        assert self.memory is not None
        return self.memory_plus if self.memory.qk_norm is None else self.memory.qk_norm

    @property
    def gated(self) -> bool:
        assert self.memory is not None
        return self.qk_norm if self.memory.gated is None else self.memory.gated

    @property
    def shared_values(self) -> bool:
        assert self.memory is not None
        return self.memory_plus if self.memory.shared_values is None else self.memory.shared_values

    @property
    def memory_layers(self) -> list[int]:
        """Indices of the layers whose FFN is a memory layer (evenly spaced by default)."""
        if family_spec(self.family).section != "memory" or self.memory is None:
            return []
        if self.memory.layers is not None:
            return sorted(self.memory.layers)
        count = self.memory.n_layers or min(3 if self.memory_plus else 1, self.n_layers)
        return evenly_spaced(count, self.n_layers)

    @property
    def peer_layers(self) -> list[int]:
        """Indices of the layers whose FFN is a PEER layer (evenly spaced by default)."""
        if self.family != "peer" or self.peer is None:
            return []
        if self.peer.layers is not None:
            return sorted(self.peer.layers)
        return evenly_spaced(self.peer.n_layers or 1, self.n_layers)

    def ffn_kind(self, layer: int) -> str:
        """'dense' | 'moe' | 'memory' | 'peer' for layer `layer`."""
        if self.family == "moe":
            return "moe"
        if layer in self.peer_layers:
            return "peer"
        return "memory" if layer in self.memory_layers else "dense"

    def validate(self, path: str = "model") -> None:
        spec = family_spec(self.family, f"{path}.family")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_multiple"):
            require(getattr(self, name) >= 1, f"{path}.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.dim % self.n_heads == 0, f"{path}.n_heads",
                f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0, f"{path}.dim", f"head dim {self.head_dim} must be even (rotary embeddings)")
        require(self.n_heads % self.kv_heads == 0, f"{path}.n_kv_heads",
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if self.ffn_dim is not None:
            require(self.ffn_dim >= 1, f"{path}.ffn_dim", f"must be >= 1, got {self.ffn_dim}")
        require(self.init_std > 0, f"{path}.init_std", f"must be > 0, got {self.init_std}")
        for section in SECTIONS:
            value = getattr(self, section)
            if spec.section == section:
                require(value is not None, f"{path}.{section}", f"family {self.family!r} needs a {section} section")
                value.validate(f"{path}.{section}")
            elif value is not None:
                takers = [name for name in FAMILIES if family_spec(name).section == section]
                raise ConfigError(f"{path}.{section}", f"only families {', '.join(takers)} take a {section} section")
        if spec.section in ("memory", "peer"):
            layers = self.memory_layers if spec.section == "memory" else self.peer_layers
            require(len(set(layers)) == len(layers) and all(0 <= i < self.n_layers for i in layers),
                    f"{path}.{spec.section}.layers",
                    f"need distinct layer indices in [0, {self.n_layers}), got {layers}")
