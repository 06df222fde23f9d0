"""TokenLoader: fixed-length training sequences from a token stream, sharded, shuffled, resumable.

The stream `ids` (N tokens, any 1-D int array; a memory map is read lazily) is cut into
S = (N - 1) // seq_len sequences of seq_len + 1 tokens; sequence s starts at s * seq_len, so
consecutive sequences overlap by one token and inputs/targets are the first/last seq_len.

Every epoch has its own order of the S sequences, a permutation seeded by (seed, epoch). The
global step takes the next batch_size * world_size sequences of that order (continuing into the
next epoch when one ends, so no sequence is dropped); rank r gets the r-th block of batch_size.
Ranks therefore read disjoint sequences, together cover every sequence once per epoch, and the
whole state is (epoch, position in the epoch's order): `state_dict()` / `load_state_dict()`
resume exactly, even with a different world size.

The epoch's order is held as a NumPy permutation (8 bytes per sequence). Torch tensors given as
`ids` are read through `.numpy()`.

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
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens one global step consumes (all ranks)."""
        return self.batch_size * self.world_size * self.seq_len

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences)
            self._order_epoch = epoch
        return self._order

    def _next_global(self, count: int) -> np.ndarray:
        """The next `count` sequence numbers of the global order; advances the state."""
        parts = []
        while count > 0:
            take = min(count, self.n_sequences - self.position)
            parts.append(self._epoch_order(self.epoch)[self.position:self.position + take])
            self.position += take
            count -= take
            if self.position == self.n_sequences:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (inputs_BT, targets_BT), int64."""
        step_S = self._next_global(self.batch_size * self.world_size)
        mine_B = step_S[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        offsets_BT1 = mine_B[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        window_BT1 = torch.from_numpy(np.asarray(self.ids[offsets_BT1], dtype=np.int64))
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
