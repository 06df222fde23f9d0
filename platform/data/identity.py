"""The identity of prepared data: what decides its tokens, hashed into a fingerprint.

The fingerprint hashes the relevant config fields, the facts generator version, DATA_VERSION, the
shard size and, for files, their names, sizes and sampled contents (local paths or URIs).
`seq_len`, `streaming` and `max_tokens` are left out: they do not change the prepared tokens
(`max_tokens` cuts the stream a run reads), so runs that differ only in them share one set, and a
larger study extends the set a smaller one prepared.
"""

from __future__ import annotations

import hashlib
import json

from memlayers.config_schema import to_dict
from memlayers.platform.data.config import FILE_SOURCES, DataConfig
from memlayers.platform.data.parts import files_digest, source_files

DATA_VERSION = 2


def identity(cfg: DataConfig, files: list[str] | None = None) -> dict:
    """The config fields (and file digests) that decide the prepared data."""
    out: dict = {"data_version": DATA_VERSION, "source": cfg.source, "tokenizer": cfg.tokenizer,
                 "val_fraction": cfg.val_fraction, "seed": cfg.seed, "shard_tokens": cfg.shard_tokens}
    if cfg.tokenizer == "bpe":
        out["vocab_size"] = cfg.vocab_size
    if cfg.source == "facts":
        out["facts"] = to_dict(cfg.facts)
    if cfg.source in FILE_SOURCES:
        out["files"] = files_digest(files if files is not None else source_files(cfg))
    if cfg.source in ("jsonl", "parquet", "hub"):
        out["text_field"] = cfg.text_field
    if cfg.source == "hub":
        out["name"], out["subset"] = cfg.name, cfg.subset
    return out


def key_of(ident: dict) -> str:
    """`<source>-<tokenizer>-<16 hex digits>`."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{ident['source']}-{ident['tokenizer']}-{digest}"


def fingerprint(cfg: DataConfig) -> str:
    """A stable id of the prepared data (see the module docstring)."""
    cfg.validate()
    return key_of(identity(cfg))
