"""The prepared-data cache: one directory per fingerprint, built once, published atomically.

`cached_build(root, key, build)` returns `root/key`, calling `build(tmp_dir)` only if that
directory does not exist yet. The build happens in a private temporary directory next to it and
is published with one `rename`, so a reader sees a complete directory or none; a file lock
(`root/.key.lock`) makes concurrent preparers (several Ray workers on one node) wait for the
first one instead of repeating its work. A crashed build leaves only a `.key.tmp-*` directory,
which is ignored and removed by the next successful build.

Token files are raw little-endian int32 (`TokenWriter` appends, `read_tokens` memory-maps), so a
corpus larger than RAM is never loaded whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

TOKEN_DTYPE = np.dtype("<i4")


def cached_build(root: Path, key: str, build: Callable[[Path], None]) -> Path:
    """`root/key`, built by `build(tmp)` into a temporary directory if it does not exist."""
    from filelock import FileLock  # deferred: only this path needs filelock

    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if final.is_dir():
            return final
        for stale in root.glob(f".{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
        try:
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class TokenWriter:
    """Appends token ids to a raw int32 file; `count` is the number written so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.count = 0

    def write(self, ids: Iterable[int] | np.ndarray) -> None:
        array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=TOKEN_DTYPE)
        array.tofile(self.file)
        self.count += int(array.size)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_tokens(path: Path) -> np.ndarray:
    """The token file as a read-only 1-D int32 array (memory-mapped unless empty)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def truncate_tokens(path: Path, count: int) -> None:
    """Keep the first `count` tokens of a token file."""
    os.truncate(path, count * TOKEN_DTYPE.itemsize)


def move_tail(src: Path, dst: Path, count: int) -> None:
    """Move the last `count` tokens of `src` to the end of `dst`."""
    size = src.stat().st_size // TOKEN_DTYPE.itemsize
    keep = size - count
    tail = np.fromfile(src, dtype=TOKEN_DTYPE, offset=keep * TOKEN_DTYPE.itemsize)
    with open(dst, "ab") as f:
        tail.tofile(f)
    truncate_tokens(src, keep)
