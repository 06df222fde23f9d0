"""TokenLoader: fixed-length training sequences from a token stream, sharded, shuffled, resumable.

The stream `ids` (N tokens, any 1-D int array; a memory map is read lazily) is cut into
S = (N - 1) // seq_len sequences of seq_len + 1 tokens; sequence s starts at s * seq_len, so
consecutive sequences overlap by one token and inputs/targets are the first/last seq_len.

Every epoch has its own order of the S sequences, a permutation seeded by (seed, epoch). A stream
made of shards (`ids.spans`: each segment's first token, shard_loader.py) is read block by block,
a block being the sequences that start in one segment: the blocks in a seeded order, the
sequences of each block in their own seeded order, so a rank reads one shard (and the start of the
next) at a time and `ids.prefetch` fetches the next block's shard while this one is read. One
block is today's plain permutation. Only the current block's order is held in memory. The
global step takes the next batch_size * world_size sequences of that order (continuing into the
next epoch when one ends, so no sequence is dropped); rank r gets the r-th block of batch_size.
Ranks therefore read disjoint sequences, together cover every sequence once per epoch, and the
whole state is (epoch, position in the epoch's order): `state_dict()` / `load_state_dict()`
resume exactly, even with a different world size.

Torch tensors given as `ids` are read through `.numpy()`.

Shapes: B = batch_size, T = seq_len, T1 = seq_len + 1, S = sequences of a global step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TokenLoader:
    """Batches (inputs_BT, targets_BT) of int64 token ids for one rank; see module docstring."""

    def __init__(self, ids: Any, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"TokenLoader: seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TokenLoader: rank {rank} is outside world_size {world_size}")
        self.ids = ids.numpy() if isinstance(ids, torch.Tensor) else ids
        if self.ids.ndim != 1:
            raise ValueError(f"TokenLoader: ids must be 1-D, got shape {tuple(self.ids.shape)}")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_sequences = (len(self.ids) - 1) // seq_len
        if self.n_sequences < 1:
            raise ValueError(f"TokenLoader: {len(self.ids)} tokens do not fill one sequence of {seq_len} + 1")
        self.epoch = 0
        self.position = 0
        self._block_first, self._block_count = self._blocks(getattr(self.ids, "spans", None))
        self._order_epoch = -1
        self._block_order = np.zeros(0, dtype=np.int64)
        self._block_ends = np.zeros(0, dtype=np.int64)
        self._inner_key: tuple[int, int] = (-1, -1)
        self._inner = np.zeros(0, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens one global step consumes (all ranks)."""
        return self.batch_size * self.world_size * self.seq_len

    def _blocks(self, spans) -> tuple[np.ndarray, np.ndarray]:
        """(first sequence, sequence count) of each non-empty block: the sequences starting in a segment."""
        if spans is None or len(spans) < 2:
            return np.zeros(1, dtype=np.int64), np.array([self.n_sequences], dtype=np.int64)
        first = np.minimum(-(-np.asarray(spans, dtype=np.int64) // self.seq_len), self.n_sequences)
        count = np.diff(np.append(first, self.n_sequences))
        return first[count > 0], count[count > 0]

    def _epoch_blocks(self, epoch: int) -> None:
        if epoch != self._order_epoch:
            n = len(self._block_count)
            self._block_order = np.random.default_rng([self.seed, epoch]).permutation(n) if n > 1 else np.zeros(1, int)
            self._block_ends = np.cumsum(self._block_count[self._block_order])
            self._order_epoch = epoch

    def _inner_order(self, epoch: int, block: int) -> np.ndarray:
        if self._inner_key != (epoch, block):
            count = int(self._block_count[block])
            key = [self.seed, epoch] if len(self._block_count) == 1 else [self.seed, epoch, block + 1]
            rng = np.random.default_rng(key)
            self._inner = rng.permutation(count) + self._block_first[block]
            self._inner_key = (epoch, block)
        return self._inner

    def _take(self, count: int) -> np.ndarray:
        """Up to `count` sequence numbers from the current position, within the current block."""
        self._epoch_blocks(self.epoch)
        k = int(np.searchsorted(self._block_ends, self.position, side="right"))
        block = int(self._block_order[k])
        offset = self.position - int(self._block_ends[k] - self._block_count[block])
        take = min(count, int(self._block_count[block]) - offset)
        return self._inner_order(self.epoch, block)[offset:offset + take]

    def _next_global(self, count: int) -> np.ndarray:
        """The next `count` sequence numbers of the global order; advances the state."""
        parts = []
        while count > 0:
            part = self._take(count)
            parts.append(part)
            self.position += len(part)
            count -= len(part)
            if self.position == self.n_sequences:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def _prefetch_next_block(self) -> None:
        """Ask a sharded stream for the block after the current one (the next epoch's first after the last)."""
        epoch = self.epoch
        self._epoch_blocks(epoch)
        k = int(np.searchsorted(self._block_ends, self.position, side="right")) + 1
        if k >= len(self._block_order):
            epoch, k = epoch + 1, 0
            if len(self._block_count) == 1:
                return
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._block_count))
        else:
            order = self._block_order
        block = int(order[k])
        first = int(self._block_first[block]) * self.seq_len
        self.ids.prefetch(first, first + int(self._block_count[block]) * self.seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs_BT, targets_BT), int64."""
        step_S = self._next_global(self.batch_size * self.world_size)
        mine_B = step_S[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        offsets_BT1 = mine_B[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window_BT1 = torch.from_numpy(np.asarray(self.ids[offsets_BT1], dtype=np.int64))
        if hasattr(self.ids, "prefetch"):
            self._prefetch_next_block()
        return window_BT1[:, :-1].contiguous(), window_BT1[:, 1:].contiguous()

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_tokens": int(len(self.ids)),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the stream, seq_len and seed must be the ones it came from."""
        for key in ("seed", "seq_len", "n_tokens"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"TokenLoader.load_state_dict: {key} is {state.get(key)!r} in the "
                                 f"checkpoint but {mine!r} here")
        if not 0 <= state["position"] < self.n_sequences:
            raise ValueError(f"TokenLoader.load_state_dict: position {state['position']} out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
