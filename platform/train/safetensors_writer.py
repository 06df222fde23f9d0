"""A safetensors file written tensor by tensor, each tensor's bytes streamed in chunks.

The format: an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
every tensor, then `__metadata__`), padded with spaces to 8 bytes, then the tensors' bytes
back to back. Writing it here rather than through `safetensors.torch.save_file` lets a tensor
larger than memory (a value table assembled from column shards) be written a block of rows at a
time; `safetensors` itself reads the result.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its name, dtype, shape and a source of its row blocks (in order)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def tensor_entry(name: str, tensor: torch.Tensor) -> Entry:
    """An entry whose bytes are one (contiguous, CPU) tensor."""
    return Entry(name, tensor.dtype, tuple(tensor.shape), lambda: iter([tensor]))


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """Write `entries` in order to `path` (through a temporary file, fsynced, renamed); -> bytes of data."""
    header: dict = {}
    offset = 0
    for entry in entries:
        if entry.dtype not in DTYPES:
            raise ValueError(f"{entry.name}: dtype {entry.dtype} has no safetensors name")
        header[entry.name] = {"dtype": DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    header["__metadata__"] = dict(metadata or {})
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for entry in entries:
            written = 0
            for block in entry.blocks():
                data = block.detach().to("cpu", entry.dtype).contiguous().reshape(-1).view(torch.uint8)
                handle.write(memoryview(data.numpy()))
                written += data.numel()
            if written != entry.nbytes:
                raise ValueError(f"{entry.name}: its blocks hold {written} bytes, its shape {entry.nbytes}")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return offset
