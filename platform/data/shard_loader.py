"""A prepared set's token stream read through a bounded local cache of its shards.

`ShardStream` is the 1-D token array a `TokenLoader` reads (`len`, `ndim`, `dtype`, fancy
indexing) made of segments: a run of one shard's train (or val) tokens. `spans` (each segment's
first token) lets the loader order sequences shard by shard, and `prefetch(lo, hi)` asks for the
shards of a token range ahead of need.

`ShardCache` keeps shards on this machine: a set on a local disk is memory-mapped where it lies;
a set in a bucket is downloaded, in background threads when prefetched, into `cache_dir` and
memory-mapped there, and the least recently used shards are deleted once the cache holds more
than `limit_bytes` (at least `MIN_SHARDS` of the largest shard: the one being read, the next in
stream order that a sequence may run into, and the prefetched ones). `peak_bytes` is the most it
ever held, so a worker's disk and memory stay bounded however large the corpus is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from memlayers.platform.cluster.storage import join, local_path
from memlayers.platform.data.shards import HEADER_BYTES, ShardInfo, download, shard_name

MIN_SHARDS = 4
PREFETCH_THREADS = 2


@dataclass(frozen=True)
class Segment:
    shard: int
    base: int          # where the region's first token lies in the shard's token body
    start: int         # first token of the segment within that region
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class ShardCache:
    """Shards of one set on this machine (see the module docstring)."""

    def __init__(self, set_root: str, dtype: np.dtype, infos: list[ShardInfo], cache_dir: Optional[Path],
                 limit_bytes: Optional[int] = None) -> None:
        self.set_root, self.dtype = set_root, np.dtype(dtype)
        self.sizes = {i.index: HEADER_BYTES + i.tokens * self.dtype.itemsize for i in infos}
        self.local = local_path(set_root)
        self.cache_dir = cache_dir
        floor = MIN_SHARDS * max(self.sizes.values(), default=0)
        self.limit_bytes = max(limit_bytes or 0, floor)
        self.held: OrderedDict[int, np.ndarray] = OrderedDict()
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()
        self.pool: Optional[ThreadPoolExecutor] = None
        self.held_bytes = self.peak_bytes = 0
        self.downloads = 0

    def _path(self, index: int) -> Path:
        if self.local is not None:
            return self.local / shard_name(index)
        assert self.cache_dir is not None, "a set in a bucket needs a local cache folder"
        return self.cache_dir / shard_name(index)

    def _fetch(self, index: int) -> Path:
        path = self._path(index)
        if self.local is None and not path.is_file():
            download(join(self.set_root, shard_name(index)), path)
            self.downloads += 1
        return path

    def prefetch(self, indices: list[int]) -> None:
        if self.local is not None:
            return
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="shard-prefetch")
            for index in indices:
                if index in self.sizes and index not in self.held and index not in self.pending:
                    self.pending[index] = self.pool.submit(self._fetch, index)

    def tokens(self, index: int) -> np.ndarray:
        """Shard `index`'s token body (train then val), memory-mapped."""
        with self.lock:
            if index in self.held:
                self.held.move_to_end(index)
                return self.held[index]
            future = self.pending.pop(index, None)
        path = future.result() if future is not None else self._fetch(index)
        body = np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER_BYTES)
        with self.lock:
            self.held[index] = body
            self.held_bytes += self.sizes[index]
            self._evict(keep=index)
            self.peak_bytes = max(self.peak_bytes, self.held_bytes + self._pending_bytes())
        return body

    def _pending_bytes(self) -> int:
        return sum(self.sizes[i] for i in self.pending)

    def _evict(self, keep: int) -> None:
        while self.held_bytes + self._pending_bytes() > self.limit_bytes and len(self.held) > 1:
            index = next(i for i in self.held if i != keep)
            del self.held[index]
            self.held_bytes -= self.sizes[index]
            if self.local is None:
                self._path(index).unlink(missing_ok=True)


class ShardStream:
    """A token stream over shard segments (see the module docstring)."""

    ndim = 1

    def __init__(self, cache: ShardCache, segments: list[Segment]) -> None:
        self.cache, self.segments = cache, [s for s in segments if len(s)]
        lengths = np.array([len(s) for s in self.segments], dtype=np.int64)
        self.spans = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else \
            np.zeros(0, dtype=np.int64)
        self.length = int(lengths.sum())
        self.dtype = cache.dtype

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    def _segment_of(self, offsets: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.spans, offsets, side="right") - 1

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.length))
        offsets = np.asarray(key, dtype=np.int64)
        if offsets.size and (offsets.min() < 0 or offsets.max() >= self.length):
            raise IndexError(f"token offsets outside a stream of {self.length}")
        out = np.empty(offsets.shape, dtype=self.dtype)
        which = self._segment_of(offsets)
        for k in np.unique(which):
            seg, mask = self.segments[k], which == k
            body = self.cache.tokens(seg.shard)
            out[mask] = body[seg.base + seg.start + (offsets[mask] - self.spans[k])]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def prefetch(self, lo: int, hi: int) -> None:
        """Fetch the shards holding tokens [lo, hi) in the background."""
        if self.length == 0:
            return
        first, last = self._segment_of(np.array([max(lo, 0), min(hi, self.length) - 1]))
        self.cache.prefetch([self.segments[k].shard for k in range(int(first), int(last) + 1)])
