"""`prepare_set`: a corpus tokenized once into the shards of a prepared set (shards.py), in storage.

    manifest = prepare_set(cfg, data_root, need=tokens, out=print)

The set of `cfg` lives at `<data_root>/<fingerprint>/`. Under the set's claim (claim.py), the
driver trains the tokenizer once on the corpus's first training documents (up to
TOKENIZER_TRAIN_CHARS) and stores it beside the shards; then the parts that hold the first `need`
training tokens (all of them when `need` is None) are tokenized into one shard each, skipping the
shards that already exist (a killed preparation resumes; a larger need extends the set), and the
manifest is published last. File corpora (text, jsonl, parquet) are tokenized by Ray Data tasks
across the cluster when Ray is initialised (ray_prepare.py), else in this process; the facts,
Shakespeare and hub corpora stream through this process into a few shards. `progress(key, record)`
sees one record per written shard (shards, tokens, tokens/s, ETA).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import pyarrow.fs as pafs

from memlayers.config_schema import ConfigError
from memlayers.platform.cluster.storage import join, local_path, open_fs
from memlayers.platform.data.claim import claimed
from memlayers.platform.data.config import FILE_SOURCES, DataConfig
from memlayers.platform.data.identity import DATA_VERSION, identity, key_of
from memlayers.platform.data.parts import Part, encode_part, part_pieces, plan_parts, source_files
from memlayers.platform.data.qa import save_qa, tokenize_pairs
from memlayers.platform.data.shards import (
    ShardInfo,
    existing_shards,
    info_dicts,
    publish_bytes,
    read_manifest,
    read_shard_header,
    set_uri,
    shard_infos,
    token_dtype,
    write_manifest,
    write_shard,
)
from memlayers.platform.data.sources import Corpus, hashed_split, open_corpus
from memlayers.platform.data.stored_tokenizer import fetch_tokenizer, save_tokenizer
from memlayers.platform.data.tokenizers import Tokenizer, train_tokenizer

TOKENIZER_TRAIN_CHARS = 200_000_000
BYTES_PER_TOKEN = {"byte": 1.0, "word": 6.0, "bpe": 4.0}  # text bytes a token stands for, to size parts

Need = Union[None, int, Callable[[int], Optional[int]]]   # training tokens, or vocab size -> training tokens


def run_need(source: str, planned_tokens: int) -> Optional[int]:
    """The training tokens a run must find prepared: what it trains on, plus the last sequence's target,
    for a corpus read from files or the hub; all of a synthetic or built-in corpus (a facts run must
    see every fact, whatever its budget)."""
    return planned_tokens + 1 if source in FILE_SOURCES or source == "hub" else None


def covers(manifest: Optional[dict], need: Optional[int]) -> bool:
    """Whether the published set holds `need` training tokens (the whole corpus when None)."""
    if manifest is None:
        return False
    return manifest["complete"] or (need is not None and manifest["train_tokens"] >= need)


def _need_tokens(need: Need, vocab_size: int, max_tokens: Optional[int]) -> Optional[int]:
    value = need(vocab_size) if callable(need) else need
    if max_tokens is not None:
        value = max_tokens if value is None else min(value, max_tokens)
    return value


class Progress:
    """Shards written, tokens, tokens/s and ETA, printed and handed to `sink` once per shard."""

    def __init__(self, key: str, out: Callable[[str], None], sink: Optional[Callable[[str, dict], None]]) -> None:
        self.key, self.out, self.sink = key, out, sink
        self.started = time.monotonic()
        self.written = self.tokens = 0

    def shard(self, info: ShardInfo, planned: int, remaining_tokens: Optional[float], node: str = "") -> None:
        self.written += 1
        self.tokens += info.tokens
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.tokens / elapsed
        eta = remaining_tokens / rate if remaining_tokens is not None and rate > 0 else None
        where = f" on {node[:12]}" if node else ""
        self.out(f"data {self.key}: shard {info.index} written{where} ({self.written}/{planned} this run), "
                 f"{self.tokens:,} tokens, {rate / 1e6:.2f} M tokens/s"
                 + (f", ETA {eta:.0f} s" if eta is not None else ""))
        if self.sink is not None:
            self.sink(self.key, {"shards_written": self.written, "tokens": self.tokens, "tokens_per_s": rate,
                       **({"eta_s": eta} if eta is not None else {})})


def _sample_texts(pieces: Iterator[tuple[int, str]], is_val: Callable[[int], bool]) -> Iterator[str]:
    budget = TOKENIZER_TRAIN_CHARS
    for doc, text in pieces:
        if is_val(doc):
            continue
        yield text
        budget -= len(text)
        if budget <= 0:
            return


def _file_corpus_pieces(cfg: DataConfig, parts: list[Part]) -> Iterator[tuple[int, str]]:
    for part in parts:
        yield from part_pieces(cfg, part)


def _tokenizer(cfg: DataConfig, set_root: str, pieces: Callable[[], Iterator[tuple[int, str]]],
               is_val: Callable[[int], bool], out: Callable[[str], None]) -> Tokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        stored = fetch_tokenizer(cfg.tokenizer, set_root, Path(tmp))
    if stored is not None:
        return stored
    started = time.monotonic()
    tokenizer = train_tokenizer(cfg.tokenizer, _sample_texts(pieces(), is_val), cfg.vocab_size)
    save_tokenizer(tokenizer, set_root)
    if cfg.tokenizer != "byte":
        out(f"data: {cfg.tokenizer} tokenizer ({tokenizer.vocab_size} entries) trained in "
            f"{time.monotonic() - started:.1f} s")
    return tokenizer


def _wanted(parts: list[Part], done: dict[int, ShardInfo], need: Optional[int], bytes_per_token: float,
            val_fraction: float) -> list[Part]:
    """The shortest prefix of parts whose (known or estimated) training tokens reach `need`."""
    if need is None:
        return parts
    total = 0.0
    for i, part in enumerate(parts):
        info = done.get(part.index)
        total += info.train_tokens if info else part.text_bytes / bytes_per_token * (1 - val_fraction)
        if total >= need:
            return parts[:i + 1]
    return parts


def _file_shards(cfg: DataConfig, set_root: str, parts: list[Part], known: dict[int, ShardInfo], dtype: np.dtype,
                 need: Optional[int], progress: Progress) -> tuple[list[ShardInfo], bool]:
    from memlayers.platform.data.ray_prepare import write_parts  # deferred: Ray only when it runs

    done = dict(known)
    for index in existing_shards(set_root):
        if index not in done and index < len(parts):
            done[index] = read_shard_header(set_root, index)
    bytes_per_token = BYTES_PER_TOKEN[cfg.tokenizer]
    while True:
        wanted = _wanted(parts, done, need, bytes_per_token, cfg.val_fraction)
        missing = [p for p in wanted if p.index not in done]
        if not missing:
            break
        estimate = sum(p.text_bytes for p in missing) / bytes_per_token
        for info, node in write_parts(cfg, set_root, missing, dtype):
            done[info.index] = info
            estimate -= next(p.text_bytes for p in missing if p.index == info.index) / bytes_per_token
            progress.shard(info, len(missing), max(estimate, 0.0), node)
    prefix = [done[p.index] for p in wanted]
    return prefix, len(wanted) == len(parts)


def _stream_shards(cfg: DataConfig, set_root: str, corpus: Corpus, tokenizer: Tokenizer, dtype: np.dtype,
                   need: Optional[int], progress: Progress) -> tuple[list[ShardInfo], bool]:
    """Facts, Shakespeare, hub: documents streamed through this process, cut into parts of about
    `shard_tokens` tokens at document boundaries."""
    existing = set(existing_shards(set_root))
    target = cfg.shard_tokens * BYTES_PER_TOKEN[cfg.tokenizer]
    infos: list[ShardInfo] = []
    chunk: list[tuple[int, str]] = []
    size = 0

    def emit() -> None:
        index = len(infos)
        if index in existing:
            infos.append(read_shard_header(set_root, index))
            return
        train, val, docs = encode_part(chunk, tokenizer, corpus.is_val)
        infos.append(write_shard(set_root, index, train, val, docs, dtype))
        progress.shard(infos[-1], index + 1, None)

    for doc, text in corpus.pieces():
        if chunk and doc != chunk[-1][0] and size >= target:
            emit()
            chunk, size = [], 0
            if need is not None and sum(i.train_tokens for i in infos) >= need:
                return infos, False
        chunk.append((doc, text))
        size += len(text)
    if chunk or not infos:
        emit()
    return infos, True


def check_storage(data_root: str) -> None:
    """A `storage` error when the data root's bucket (or folder's disk) cannot be reached or does not exist."""
    if local_path(data_root) is not None:
        return
    try:
        fs, path = open_fs(data_root)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError("storage", f"bucket {bucket!r} of {data_root} does not exist")
    except OSError as error:
        raise ConfigError("storage", f"cannot reach {data_root}: {error}".splitlines()[0]) from error


def check_source(cfg: DataConfig, data_root: str) -> tuple[Optional[list[str]], list[Part]]:
    """(files, parts) of a file corpus ((None, []) for the others) once its config, storage and files
    check out; else the `ConfigError` naming data.path, data.text_field or storage. Writes nothing."""
    cfg.validate()
    check_storage(data_root)
    if cfg.source not in FILE_SOURCES:
        return None, []
    files = source_files(cfg)
    return files, plan_parts(cfg, int(cfg.shard_tokens * BYTES_PER_TOKEN[cfg.tokenizer]), files)


def _versions() -> dict[str, str]:
    import importlib.metadata as md  # deferred: only a manifest records versions

    out = {"data_version": str(DATA_VERSION)}
    for name in ("memlayers", "tokenizers", "pyarrow", "ray"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def prepare_set(cfg: DataConfig, data_root: str, need: Need = None, *, out: Callable[[str], None] = print,
                progress: Optional[Callable[[str, dict], None]] = None, hf_cache: Optional[Path] = None) -> dict:
    """Prepare (or extend) the set of `cfg` under `data_root` to hold `need` training tokens; returns
    its manifest (see the module docstring)."""
    files, parts = check_source(cfg, str(data_root))
    ident = identity(cfg, files)
    key = key_of(ident)
    set_root = set_uri(str(data_root), key)
    manifest = read_manifest(set_root)
    if manifest is not None and covers(manifest, _need_tokens(need, manifest["vocab_size"], cfg.max_tokens)):
        return manifest
    with claimed(set_root, out):
        manifest = read_manifest(set_root)
        if manifest is not None and covers(manifest, _need_tokens(need, manifest["vocab_size"], cfg.max_tokens)):
            return manifest
        if files is not None:
            is_val = hashed_split(cfg.seed, cfg.val_fraction)
            corpus = Corpus(lambda: _file_corpus_pieces(cfg, parts), is_val)
        else:
            corpus = open_corpus(cfg, hf_cache or Path(tempfile.gettempdir()) / "memlayers-hf")
        tokenizer = _tokenizer(cfg, set_root, corpus.pieces, corpus.is_val, out)
        needed = _need_tokens(need, tokenizer.vocab_size, cfg.max_tokens)
        dtype = token_dtype(tokenizer.vocab_size)
        tracker = Progress(key, out, progress)
        known = {i.index: i for i in shard_infos(manifest)} if manifest else {}
        if files is not None:
            infos, complete = _file_shards(cfg, set_root, parts, known, dtype, needed, tracker)
        else:
            infos, complete = _stream_shards(cfg, set_root, corpus, tokenizer, dtype, needed, tracker)
        qa = tokenize_pairs(corpus.qa, tokenizer)
        if qa:
            with tempfile.TemporaryDirectory() as tmp:
                save_qa(qa, Path(tmp) / "qa.json")
                publish_bytes(join(set_root, "qa.json"), (Path(tmp) / "qa.json").read_bytes())
        manifest = {
            "fingerprint": key, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "dtype": dtype.str, "complete": complete,
            "parts": len(parts) if files is not None else (len(infos) if complete else None),
            "shards": info_dicts(infos), "qa_items": len(qa),
            **{k: sum(getattr(i, k) for i in infos) for k in ("train_tokens", "val_tokens", "train_documents",
                                                              "val_documents")},
            "identity": ident, "versions": _versions(),
        }
        write_manifest(set_root, manifest)
    if tracker.written:
        out(f"data {key}: prepared {len(infos)} shards, {manifest['train_tokens']:,} training tokens"
            f"{'' if complete else ' (the study needs no more)'} in {set_root}")
    return manifest


def describe(manifest: dict) -> dict:
    """A manifest's totals (for status lines and MLflow params)."""
    return {k: manifest[k] for k in ("fingerprint", "tokenizer", "vocab_size", "complete", "train_tokens",
                                     "val_tokens", "train_documents", "val_documents")} | {
        "shards": len(manifest["shards"])}

