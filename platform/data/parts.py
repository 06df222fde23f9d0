"""Parts: a corpus cut into contiguous runs of documents, one shard each, readable on any node.

`plan_parts(cfg, target_bytes)` lists a file corpus's parts from metadata (no text is read for
parquet; JSONL files are scanned for their row counts): a parquet part is a run of one file's row
groups, a JSONL part one file, a text part a run of whole files (a text file is one document).
Each part knows the global number of its first document, so a task reading only its part splits
train/validation with the same seeded document hash as the single-process reader (sources.py)
and yields the same pieces: a row is one piece, a text file's lines (line breaks kept, universal
newlines) are its pieces. Files are named by path or by any URI `pyarrow.fs` opens.

`encode_part` turns a part's pieces into its train and validation token arrays the way the
single-process stream does (pieces encoded one by one, EOS after each document).

Bad sources fail here, before anything is written: `data.path` (nothing matches, unreadable,
bucket unreachable) and `data.text_field` (a parquet file without the column).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs

from memlayers.config_schema import ConfigError
from memlayers.platform.cluster.storage import is_local, open_fs
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.sources import EXTENSIONS, SAMPLE_BYTES, resolve_files
from memlayers.platform.data.tokenizers import Tokenizer

ENCODE_BATCH_PIECES = 1000


@dataclass(frozen=True)
class Part:
    """A contiguous run of documents: `files` (with `row_groups` of the one parquet file) from `first_doc`."""

    index: int
    files: tuple[str, ...]
    first_doc: int
    documents: int
    text_bytes: int
    row_groups: tuple[int, ...] = ()


def source_files(cfg: DataConfig) -> list[str]:
    """The files `cfg.path` names, sorted: local paths (file, glob, directory) or URIs."""
    if is_local(cfg.path):
        return [str(p) for p in resolve_files(cfg)]
    try:
        fs, root = open_fs(cfg.path)
        pattern = any(c in root for c in "*?[")
        base = root.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if pattern else root
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            found = [base]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File]
            found = [p for p in found if fnmatch.fnmatch(p, root)] if pattern else \
                [p for p in found if p.endswith(EXTENSIONS[cfg.source])]
        else:
            found = []
    except (OSError, ValueError) as error:
        raise ConfigError("data.path", f"cannot list {cfg.path!r}: {error}".splitlines()[0]) from error
    if not found:
        raise ConfigError("data.path", f"no {cfg.source} files match {cfg.path!r}")
    prefix = cfg.path.split("://", 1)[0] + "://"
    return [prefix + p for p in sorted(found)]


def files_digest(files: Sequence[str]) -> list[list]:
    """Per file: name, size and a hash of its first, middle and last MiB (fast, path-free); in a bucket,
    name, size and modification time (one metadata request, not three reads, per file)."""
    out = []
    for uri in files:
        fs, path = open_fs(uri)
        if not is_local(uri):
            info = fs.get_file_info(path)
            out.append([info.base_name, info.size, info.mtime_ns])
            continue
        with fs.open_input_file(path) as f:
            size = f.size()
            digest = hashlib.blake2b(digest_size=16)
            for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                f.seek(start)
                digest.update(f.read(SAMPLE_BYTES))
        out.append([path.rsplit("/", 1)[-1], size, digest.hexdigest()])
    return out


def _open_parquet(uri: str):
    import pyarrow.parquet as pq  # deferred: only parquet corpora need it

    fs, path = open_fs(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def _parquet_parts(cfg: DataConfig, files: list[str], target_bytes: int) -> list[Part]:
    parts: list[Part] = []
    doc = 0
    for uri in files:
        try:
            meta = _open_parquet(uri).metadata
        except Exception as error:
            raise ConfigError("data.path", f"cannot read {uri} as parquet: {error}".splitlines()[0]) from error
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if cfg.text_field not in names:
            raise ConfigError("data.text_field", f"column {cfg.text_field!r} not in {uri} "
                                                 f"(columns: {', '.join(sorted(names))})")
        column = names.index(cfg.text_field)
        groups: list[int] = []
        rows = size = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            groups.append(g)
            rows += group.num_rows
            size += group.column(column).total_uncompressed_size
            if size >= target_bytes or g == meta.num_row_groups - 1:
                parts.append(Part(len(parts), (uri,), doc, rows, size, tuple(groups)))
                doc, groups, rows, size = doc + rows, [], 0, 0
    return parts


def _read_bytes(uri: str) -> bytes:
    fs, path = open_fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def _jsonl_rows(data: bytes) -> Iterator[dict]:
    for line in data.splitlines():
        if line.strip():
            yield json.loads(line)


def _jsonl_parts(cfg: DataConfig, files: list[str]) -> list[Part]:
    parts: list[Part] = []
    doc = 0
    for uri in files:
        data = _read_bytes(uri)
        rows = list(_jsonl_rows(data))
        if rows and cfg.text_field not in set().union(*(r.keys() for r in rows[:1000])):
            raise ConfigError("data.text_field", f"column {cfg.text_field!r} not in {uri} "
                                                 f"(columns: {', '.join(sorted(rows[0]))})")
        parts.append(Part(len(parts), (uri,), doc, len(rows), len(data)))
        doc += len(rows)
    return parts


def _text_parts(files: list[str], target_bytes: int) -> list[Part]:
    parts: list[Part] = []
    group: list[str] = []
    size = 0
    for i, uri in enumerate(files):
        fs, path = open_fs(uri)
        group.append(uri)
        size += fs.get_file_info(path).size
        if size >= target_bytes or i == len(files) - 1:
            parts.append(Part(len(parts), tuple(group), i + 1 - len(group), len(group), size))
            group, size = [], 0
    return parts


def plan_parts(cfg: DataConfig, target_bytes: int, files: list[str] | None = None) -> list[Part]:
    """The parts of a file corpus (text, jsonl, parquet) of about `target_bytes` of text each."""
    files = files if files is not None else source_files(cfg)
    if cfg.source == "parquet":
        return _parquet_parts(cfg, files, target_bytes)
    if cfg.source == "jsonl":
        return _jsonl_parts(cfg, files)
    return _text_parts(files, target_bytes)


def part_pieces(cfg: DataConfig, part: Part) -> Iterator[tuple[int, str]]:
    """(document number, text) of the part's pieces, in corpus order."""
    if cfg.source == "parquet":
        table = _open_parquet(part.files[0]).read_row_groups(list(part.row_groups), columns=[cfg.text_field])
        for doc, text in enumerate(table.column(0).to_pylist(), start=part.first_doc):
            yield doc, text if isinstance(text, str) else ""
    elif cfg.source == "jsonl":
        for doc, row in enumerate(_jsonl_rows(_read_bytes(part.files[0])), start=part.first_doc):
            text = row.get(cfg.text_field)
            yield doc, text if isinstance(text, str) else ""
    else:
        for doc, uri in enumerate(part.files, start=part.first_doc):
            # universal newlines, then split on "\n" only, as the `datasets` text reader does
            text = io.TextIOWrapper(io.BytesIO(_read_bytes(uri)), encoding="utf-8").read()
            for line in io.StringIO(text).readlines():
                yield doc, line


def encode_part(pieces: Iterable[tuple[int, str]], tokenizer: Tokenizer, is_val: Callable[[int], bool]
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(train ids, val ids, (train documents, val documents)); pieces encoded in batches, EOS ends a document."""
    out: dict[bool, list[int]] = {False: [], True: []}
    documents = {False: 0, True: 0}
    current, current_val, eos = None, False, tokenizer.eos_id
    batch: list[tuple[int, str]] = []

    def flush() -> None:
        nonlocal current, current_val
        for (doc, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            if doc != current:
                if current is not None:
                    out[current_val].append(eos)
                current, current_val = doc, is_val(doc)
                documents[current_val] += 1
            out[current_val].extend(ids)
        batch.clear()

    for piece in pieces:
        batch.append(piece)
        if len(batch) >= ENCODE_BATCH_PIECES:
            flush()
    flush()
    if current is not None:
        out[current_val].append(eos)
    return np.asarray(out[False], dtype=np.int64), np.asarray(out[True], dtype=np.int64), \
        (documents[False], documents[True])
