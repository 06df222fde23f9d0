"""CPU allocator settings for training steps that allocate and free large temporaries.

A memory-layer step on CPU creates a few tensors of hundreds of MB (the value-gradient rows,
optimizer chunks, autograd buffers) and frees them again. glibc serves such sizes with fresh
`mmap`s and returns them with `munmap`, so every step page-faults all of that memory in again;
on virtual machines a page fault is expensive, several times the cost of refilling memory the
process already owns (measurements: docs/bench/performance-2026-12-02.md).

- `keep_freed_memory()`: glibc `mallopt`s so that large blocks come from the heap and freed
  memory stays in the process (M_MMAP_MAX = 0, trim threshold 2 GB, top pad 64 MB). Peak RSS is
  unchanged (it is the high-water mark); the memory is reused instead of faulted in again.
  `RunLoop` calls it when it is built (every training process: Ray Train workers, in-trial
  cells, benchmarks); it applies the settings once per process. No-op (returns False) without glibc.
  In a small dense step the logits (T x vocab) and their gradients are the large blocks.
- `HUGE_PAGES_ENV`: torch's own switch (read once, when torch first allocates): with
  THP_MEM_ALLOC_ENABLE=1 large tensors are 2 MB aligned and advised for transparent huge pages,
  which cuts page faults and TLB misses on random row reads from a large table. It must be in the
  environment before torch is imported, so it is meant for child processes / launch scripts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

HUGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Tune glibc malloc to keep and reuse freed large blocks, once per process; -> True when applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) and mallopt(_M_TOP_PAD, 64 << 20)
    return bool(ok)
