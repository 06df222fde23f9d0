"""Slot-usage diagnostics of a memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

`SlotUsage` counts how often each slot was read over a sliding window of the last `window`
updates (one update = the slots a step read, any shape) and reports:

- `slot_fraction_read`: fraction of the N slots read at least once in the window;
- `slot_kl_uniform`: KL(p || uniform) in nats, p = read counts / total reads
  (0 when every slot is read equally often; log N when one slot takes every read);
- `slot_gini`: Gini coefficient of the read counts over all N slots
  (0 = perfectly even, (N - 1) / N = one slot takes everything).

Cost: an update adds the step's reads to an (N,) int32 count with `index_add_` and subtracts the
reads that leave the window — O(reads), never O(N); the window keeps its steps' slots (int32,
4 bytes per read). `metrics()` is O(N) for the fraction and KL and O(R log R) for the Gini over
the R slots read (the unread ones are all zeros); call it at logging time, not every step.
"""

from __future__ import annotations

from collections import deque

import torch


class SlotUsage:
    def __init__(self, n_slots: int, window: int = 100) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots: must be >= 1, got {n_slots}")
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.n_slots, self.window = n_slots, window
        self.counts_N = torch.zeros(n_slots, dtype=torch.int32)
        self._steps: deque[torch.Tensor] = deque()

    def update(self, slots: torch.Tensor) -> None:
        """Add the slots read by one step (any shape); the oldest step leaves a full window."""
        slots_R = slots.detach().reshape(-1).to(device="cpu", dtype=torch.int32)
        if slots_R.numel() and (int(slots_R.min()) < 0 or int(slots_R.max()) >= self.n_slots):
            raise ValueError(f"slots: must be in [0, {self.n_slots}), got [{int(slots_R.min())}, {int(slots_R.max())}]")
        self.counts_N.index_add_(0, slots_R, torch.ones_like(slots_R))
        self._steps.append(slots_R)
        if len(self._steps) > self.window:
            old_R = self._steps.popleft()
            self.counts_N.index_add_(0, old_R, torch.full_like(old_R, -1))

    def reset(self) -> None:
        self.counts_N.zero_()
        self._steps.clear()

    def metrics(self) -> dict[str, float]:
        read_R = self.counts_N[self.counts_N > 0].to(torch.float64)
        total = float(read_R.sum())
        if total == 0:
            return {"slot_fraction_read": 0.0, "slot_kl_uniform": 0.0, "slot_gini": 0.0}
        p_R = read_R / total
        kl = float((p_R * torch.log(p_R * self.n_slots)).sum())
        # Gini over all N counts sorted ascending: the N - R zeros come first and add nothing
        n, r = self.n_slots, read_R.numel()
        ranks_R = torch.arange(n - r + 1, n + 1, dtype=torch.float64)
        gini = float(((2 * ranks_R - n - 1) * read_R.sort().values).sum()) / (n * total)
        return {"slot_fraction_read": r / n, "slot_kl_uniform": max(kl, 0.0), "slot_gini": gini}
