"""Slot-usage diagnostics of a memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

`SlotUsage` counts how often each slot was read over a sliding window of the last `window`
updates (one update = the slots a step read, any shape) and reports:

- `slot_fraction_read`: fraction of the N slots read at least once in the window;
- `slot_kl_uniform`: KL(p || uniform) in nats, p = read counts / total reads
  (0 when every slot is read equally often; log N when one slot takes every read);
- `slot_gini`: Gini coefficient of the read counts over all N slots
  (0 = perfectly even, (N - 1) / N = one slot takes everything).

Cost: an update adds the step's reads to an (N,) int32 count and subtracts the reads that leave
the window, in one C++ pass (`cpu_ops.slot_usage_update_`; `index_add_` where the C++ ops do not
apply). The window keeps each step as its slots (int32, 4 bytes per read: O(reads), never O(N))
or, when the step read at least N slots, as a histogram over the N slots (4 bytes per slot,
fewer than its reads): a 16k-slot memory read 131k times a step keeps 64 KB a step instead of
512 KB, and the update touches that much less memory (which matters in a training step, where
the window's old steps are out of cache).
`metrics()` is O(N) for the fraction and KL and O(U log U) for the Gini over the U slots read
(the unread ones are all zeros; sorted by numpy, whose sort of small int arrays is far cheaper than
torch's CPU sort); call it at logging time, not every step.

Shape suffixes: see docs/shapes.md (L reads of a step, U distinct slots read).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from memlayers.kernels import cpu_ops

NO_SLOTS = torch.empty(0, dtype=torch.int32)


class SlotUsage:
    def __init__(self, n_slots: int, window: int = 100) -> None:
        if n_slots < 1:
            raise ValueError(f"n_slots: must be >= 1, got {n_slots}")
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        self.n_slots, self.window = n_slots, window
        self.counts_N = torch.zeros(n_slots, dtype=torch.int32)
        self._steps: deque[tuple[torch.Tensor, bool]] = deque()  # (a step's slots or histogram, is a histogram)

    def update(self, slots: torch.Tensor) -> None:
        """Add the slots read by one step (any shape); the oldest step leaves a full window."""
        slots = slots.detach().to("cpu")
        leaving = len(self._steps) >= self.window
        old, old_is_histogram = self._steps[0] if leaving else (NO_SLOTS, False)
        ops = cpu_ops.applies(slots) if slots.dtype in (torch.int32, torch.int64) else None
        if ops is not None:  # one C++ pass: checked, counted, kept as int32, the oldest step removed
            as_histogram = slots.numel() >= self.n_slots
            try:
                kept = ops.slot_usage_update_(self.counts_N, slots, old, as_histogram, old_is_histogram)
            except RuntimeError as error:
                raise ValueError(str(error).splitlines()[0]) from None
        else:
            as_histogram, kept = False, slots.reshape(-1).to(torch.int32)
            if kept.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.n_slots):
                raise ValueError(f"slots: must be in [0, {self.n_slots}), got [{int(slots.min())}, {int(slots.max())}]")
            self.counts_N.index_add_(0, kept, torch.ones_like(kept))
            if old_is_histogram:
                self.counts_N.sub_(old)
            elif leaving:
                self.counts_N.index_add_(0, old, torch.full_like(old, -1))
        self._steps.append((kept, as_histogram))
        if leaving:
            self._steps.popleft()

    def reset(self) -> None:
        self.counts_N.zero_()
        self._steps.clear()

    def metrics(self) -> dict[str, float]:
        read_U = self.counts_N[self.counts_N > 0].to(torch.float64)
        total = float(read_U.sum())
        if total == 0:
            return {"slot_fraction_read": 0.0, "slot_kl_uniform": 0.0, "slot_gini": 0.0}
        p_U = read_U / total
        kl = float((p_U * torch.log(p_U * self.n_slots)).sum())
        # Gini over all N counts sorted ascending: the N - U zeros come first and add nothing
        n, u = self.n_slots, read_U.numel()
        ranks_U = torch.arange(n - u + 1, n + 1, dtype=torch.float64)
        ascending_U = torch.from_numpy(np.sort(read_U.numpy()))
        gini = float(((2 * ranks_U - n - 1) * ascending_U).sum()) / (n * total)
        return {"slot_fraction_read": u / n, "slot_kl_uniform": max(kl, 0.0), "slot_gini": gini}
