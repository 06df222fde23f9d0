"""Sort/segment layout of the reads of an embedding bag, for deterministic value gradients.

The value gradient of a row is a sum over every read of that row. Instead of scattering with
atomics (non-deterministic, and refused on bf16), the L = T*R reads are stably sorted by slot, so
the reads of one row form a contiguous segment; each segment is then summed in a fixed order
(sorted slot, then read position). Cost O(L log L), independent of the number of slots N.

Shape suffixes: see docs/shapes.md (R reads per token, L = T * R reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memlayers.kernels import cpu_ops

COUNTING_SORT_SLOTS_PER_READ = 4  # the counting sort's O(N) pass stays within a few times O(L)


def counting_pass_pays(n_slots: int | None, reads: int) -> bool:
    """True when an O(N) pass over the slots costs no more than a few times the O(L) work on the reads."""
    return n_slots is not None and n_slots <= COUNTING_SORT_SLOTS_PER_READ * reads + 4096


@dataclass(frozen=True)
class Segments:
    unique_U: torch.Tensor   # int64, the unique slots read, ascending
    start_U1: torch.Tensor   # int64 (U+1,), segment u covers sorted reads [start[u], start[u+1])
    read_L: torch.Tensor     # int64, flat read index (t*R + j) of each sorted read
    token_L: torch.Tensor    # int64, token index t of each sorted read


def segments_of(slots_TR: torch.Tensor, n_slots: int | None = None) -> Segments:
    """Stable sort of the reads by slot and the segment boundaries of each unique slot.

    With `n_slots` < 2^31 the sort runs on int32 keys (several times faster on CPU than int64).
    On CPU, with the C++ ops (`memlayers.kernels.cpu_ops`) and no more than a few slots per read,
    a counting sort gives the same segments in O(L + N).
    """
    r = slots_TR.shape[1]
    keys_L = slots_TR.reshape(-1)
    ops = cpu_ops.applies(keys_L)
    if ops is not None and counting_pass_pays(n_slots, keys_L.numel()):
        unique_U, start_U1, read_L = ops.sort_reads(keys_L.long(), n_slots)
        return Segments(unique_U, start_U1, read_L, torch.div(read_L, r, rounding_mode="floor"))
    if n_slots is not None and n_slots < 2 ** 31:
        keys_L = keys_L.to(torch.int32)
    sorted_L, read_L = torch.sort(keys_L, stable=True)
    unique_U, counts_U = torch.unique_consecutive(sorted_L.long(), return_counts=True)
    start_U1 = torch.zeros(unique_U.numel() + 1, dtype=torch.int64, device=slots_TR.device)
    torch.cumsum(counts_U, 0, out=start_U1[1:])
    return Segments(unique_U, start_U1, read_L, torch.div(read_L, r, rounding_mode="floor"))
