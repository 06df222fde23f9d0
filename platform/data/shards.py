"""Token shards and the manifest of a prepared set, in storage (a path or any URI `pyarrow.fs` opens).

A prepared set lives in one folder, `<data root>/<fingerprint>/`:

    manifest.json            shards (tokens and documents per split), tokenizer, identity, versions
    tokenizer.json | words.json   the tokenizer (bpe | word), trained once
    qa.json                  QA items (facts only)
    shards/00000.tok ...     one file per part of the corpus, in corpus order

A shard file is a 64-byte header (magic, dtype, train/val token and document counts) followed by
the part's training tokens and then its validation tokens, each document ended by EOS. Tokens are
little-endian uint16 when the vocabulary fits, int32 otherwise. Every file is published whole:
written to a temporary name and renamed on a local disk, one PUT in a bucket (an object appears
only when its upload completes), so a file that exists is complete.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from memlayers.platform.cluster.storage import join, local_path, open_fs, read_bytes, write_bytes

MAGIC = b"MLTOKSH1"
HEADER = struct.Struct("<8s8sqqqqqq")        # magic, dtype name, train/val tokens, train/val documents, 2 spare
HEADER_BYTES = 64
MANIFEST = "manifest.json"
SHARDS = "shards"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


@dataclass(frozen=True)
class ShardInfo:
    """One shard's counts, as its header and the manifest record them."""

    index: int
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int

    @property
    def tokens(self) -> int:
        return self.train_tokens + self.val_tokens


def set_uri(data_root: str, key: str) -> str:
    """The folder of the prepared set `key` under `data_root`."""
    return join(data_root, key)


def shard_name(index: int) -> str:
    return f"{SHARDS}/{index:05d}.tok"


def publish_bytes(uri: str, data: bytes) -> None:
    """Write `uri` whole: temp file + rename locally, one PUT remotely."""
    path = local_path(uri)
    if path is None:
        write_bytes(uri, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encode_shard(index: int, train: np.ndarray, val: np.ndarray, documents: tuple[int, int], dtype: np.dtype) -> bytes:
    header = HEADER.pack(MAGIC, dtype.str.encode().ljust(8), len(train), len(val), documents[0], documents[1], 0, 0)
    return header + np.asarray(train, dtype=dtype).tobytes() + np.asarray(val, dtype=dtype).tobytes()


def parse_header(index: int, raw: bytes) -> tuple[ShardInfo, np.dtype]:
    magic, dtype, train, val, train_docs, val_docs, _, _ = HEADER.unpack(raw[:HEADER_BYTES])
    if magic != MAGIC:
        raise ValueError(f"shard {index}: not a token shard (magic {magic!r})")
    return ShardInfo(index, train, val, train_docs, val_docs), np.dtype(dtype.decode().strip())


def write_shard(set_root: str, index: int, train: np.ndarray, val: np.ndarray, documents: tuple[int, int],
                dtype: np.dtype) -> ShardInfo:
    """Publish shard `index` of the set at `set_root`; returns its counts."""
    publish_bytes(join(set_root, shard_name(index)), encode_shard(index, train, val, documents, dtype))
    return ShardInfo(index, len(train), len(val), *documents)


def read_shard_header(set_root: str, index: int) -> ShardInfo:
    fs, path = open_fs(join(set_root, shard_name(index)))
    with fs.open_input_file(path) as f:
        return parse_header(index, f.read(HEADER_BYTES))[0]


def existing_shards(set_root: str) -> list[int]:
    """Indices of the shards already published under `set_root` (temp files ignored)."""
    fs, path = open_fs(join(set_root, SHARDS))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path))]
    return sorted(int(n[:-4]) for n in names if n.endswith(".tok") and n[:-4].isdigit())


def read_manifest(set_root: str) -> Optional[dict]:
    raw = read_bytes(join(set_root, MANIFEST))
    return json.loads(raw) if raw is not None else None


def write_manifest(set_root: str, manifest: dict) -> None:
    publish_bytes(join(set_root, MANIFEST), json.dumps(manifest, indent=1).encode())


def shard_infos(manifest: dict) -> list[ShardInfo]:
    return [ShardInfo(**s) for s in manifest["shards"]]


def info_dicts(infos: list[ShardInfo]) -> list[dict]:
    return [asdict(i) for i in infos]


def download(uri: str, local: Path) -> int:
    """Copy `uri` to `local` (temp + rename, so a reader never sees half a file); returns its bytes."""
    fs, path = open_fs(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    with fs.open_input_stream(path) as source, open(tmp, "wb") as target:
        while chunk := source.read(8 << 20):
            target.write(chunk)
    os.replace(tmp, local)
    return local.stat().st_size
