"""The key/value cache of incremental decoding: every layer's keys and values so far.

A batch of prompts of different lengths is left-padded to one width: row b starts with `pad_B[b]`
pad positions, which no query attends to, and its real tokens take rotary positions 0, 1, ...
The cache holds `capacity` positions per row; `length` of them are filled. `Transformer.forward(
tokens_BS, cache=cache)` reads `positions_BS()` and `mask_BSZ()` for its S new tokens, each
attention layer stores its new keys and values with `layer(i).update(...)`, and the model calls
`advance(S)` at the end.

Shape suffixes: see docs/shapes.md (`Z`: cached positions a query may attend to).
"""

from __future__ import annotations

import torch


class LayerKV:
    """One attention layer's part of a `KVCache`."""

    def __init__(self, cache: "KVCache", keys_BGSA: torch.Tensor, values_BGSA: torch.Tensor) -> None:
        self.cache, self.keys_BGSA, self.values_BGSA = cache, keys_BGSA, values_BGSA

    def update(self, k_BGSA: torch.Tensor, v_BGSA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values; return all filled ones, (B, G, Z, A) each."""
        start, end = self.cache.length, self.cache.length + k_BGSA.shape[2]
        self.keys_BGSA[:, :, start:end] = k_BGSA
        self.values_BGSA[:, :, start:end] = v_BGSA
        return self.keys_BGSA[:, :, :end], self.values_BGSA[:, :, :end]


class KVCache:
    def __init__(self, n_layers: int, pad_B: torch.Tensor, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.pad_B, self.capacity, self.length = pad_B, capacity, 0
        shape = (pad_B.shape[0], kv_heads, capacity, head_dim)
        self.layers = [LayerKV(self, torch.zeros(shape, dtype=dtype, device=pad_B.device),
                               torch.zeros(shape, dtype=dtype, device=pad_B.device)) for _ in range(n_layers)]

    def layer(self, index: int) -> LayerKV:
        return self.layers[index]

    def positions_BS(self, new: int) -> torch.Tensor:
        """Rotary positions of the next `new` tokens of every row (0 on pad positions)."""
        steps_S = torch.arange(self.length, self.length + new, device=self.pad_B.device)
        return (steps_S[None, :] - self.pad_B[:, None]).clamp(min=0)

    def mask_BSZ(self, new: int) -> torch.Tensor:
        """Which cached positions each new token attends to: real ones up to itself (a pad
        position attends to itself alone, so that every query row has a finite softmax)."""
        if self.length + new > self.capacity:
            raise ValueError(f"kv cache: {self.length + new} positions exceed its capacity {self.capacity}")
        device = self.pad_B.device
        query_S = torch.arange(self.length, self.length + new, device=device)
        key_Z = torch.arange(self.length + new, device=device)
        causal_SZ = key_Z[None, :] <= query_S[:, None]
        real_BZ = key_Z[None, :] >= self.pad_B[:, None]
        return (causal_SZ[None] & real_BZ[:, None, :]) | (key_Z[None, None, :] == query_S[None, :, None])

    def advance(self, new: int) -> None:
        self.length += new
