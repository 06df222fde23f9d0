"""Raw int32 token files of the single-process reference (prepare.py `reference_streams`).

`TokenWriter` appends little-endian int32 ids, `read_tokens` memory-maps a file back, so a
corpus larger than RAM is never loaded whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

TOKEN_DTYPE = np.dtype("<i4")


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
