"""prepare_data: the one entry point from a DataConfig to tokens, tokenizer and QA split.

`prepare_data(cfg, cache_dir)` opens the corpus (sources.py), fits the tokenizer on the
training documents (at most TOKENIZER_TRAIN_CHARS characters of them), writes the token streams
(each document followed by EOS) and the QA items, and publishes them atomically under
`cache_dir/<fingerprint>/`:

    meta.json   counts, config identity, versions      train.bin / val.bin   int32 tokens
    qa.json     QA items (facts only)                  words.json | tokenizer.json (word | bpe)

Later calls with the same fingerprint (any process, e.g. every Ray worker) only read that
directory. The fingerprint hashes what decides the data: the relevant config fields, the facts
generator version, DATA_VERSION and, for local files, their names, sizes and sampled contents;
`seq_len` and `streaming` are left out because they do not change the tokens.

If the document split leaves validation empty (e.g. a single text file), the last
`ceil(val_fraction * n)` training tokens become the validation stream instead (meta `val_split`
says which rule applied). `max_tokens` truncates the training stream.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from memlayers.config_schema import to_dict
from memlayers.platform.data.cache import TokenWriter, cached_build, move_tail, read_tokens, truncate_tokens
from memlayers.platform.data.config import FILE_SOURCES, DataConfig
from memlayers.platform.data.qa import QAItem, load_qa, save_qa, tokenize_pairs
from memlayers.platform.data.sources import Corpus, files_digest, open_corpus, resolve_files
from memlayers.platform.data.tokenizers import Tokenizer, load_tokenizer, train_tokenizer

DATA_VERSION = 1
TOKENIZER_TRAIN_CHARS = 200_000_000
ENCODE_BATCH_PIECES = 1000


@dataclass
class PreparedData:
    """What a training worker needs; `train_ids`/`val_ids` are int32 (memory-mapped) arrays."""

    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    qa: list[QAItem]
    fingerprint: str
    directory: Path
    meta: dict = field(default_factory=dict)


def identity(cfg: DataConfig) -> dict:
    """The config fields (and file digests) that decide the prepared data."""
    out: dict = {"data_version": DATA_VERSION, "source": cfg.source, "tokenizer": cfg.tokenizer,
                 "val_fraction": cfg.val_fraction, "seed": cfg.seed, "max_tokens": cfg.max_tokens}
    if cfg.tokenizer == "bpe":
        out["vocab_size"] = cfg.vocab_size
    if cfg.source == "facts":
        out["facts"] = to_dict(cfg.facts)
    if cfg.source in FILE_SOURCES:
        out["files"] = files_digest(resolve_files(cfg))
    if cfg.source in ("jsonl", "parquet", "hub"):
        out["text_field"] = cfg.text_field
    if cfg.source == "hub":
        out["name"], out["subset"] = cfg.name, cfg.subset
    return out


def fingerprint(cfg: DataConfig) -> str:
    """A stable id of the prepared data: `<source>-<tokenizer>-<16 hex digits>`."""
    cfg.validate()
    return _fingerprint(identity(cfg))


def _fingerprint(ident: dict) -> str:
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{ident['source']}-{ident['tokenizer']}-{digest}"


def prepare_data(cfg: DataConfig, cache_dir: Path) -> PreparedData:
    """Tokens, tokenizer and QA split for `cfg`, built once per fingerprint under `cache_dir`."""
    cfg.validate()
    cache_dir = Path(cache_dir)
    ident = identity(cfg)
    key = _fingerprint(ident)
    directory = cached_build(cache_dir, key, lambda out: _build(cfg, cache_dir, ident, key, out))
    return load_prepared(directory)


def load_prepared(directory: Path) -> PreparedData:
    """Read a directory that `prepare_data` published."""
    meta = json.loads((directory / "meta.json").read_text())
    return PreparedData(tokenizer=load_tokenizer(meta["tokenizer"], directory),
                        train_ids=read_tokens(directory / "train.bin"), val_ids=read_tokens(directory / "val.bin"),
                        qa=load_qa(directory / "qa.json"), fingerprint=meta["fingerprint"],
                        directory=directory, meta=meta)


def _training_texts(corpus: Corpus) -> Iterator[str]:
    budget = TOKENIZER_TRAIN_CHARS
    for doc, text in corpus.pieces():
        if corpus.is_val(doc):
            continue
        yield text
        budget -= len(text)
        if budget <= 0:
            return


class _SplitStreams:
    """Routes each document's tokens to train.bin or val.bin and ends every document with EOS."""

    def __init__(self, out: Path, corpus: Corpus, eos_id: int) -> None:
        self.train, self.val = TokenWriter(out / "train.bin"), TokenWriter(out / "val.bin")
        self.is_val, self.eos_id = corpus.is_val, eos_id
        self.pending: dict[bool, list[int]] = {False: [], True: []}
        self.documents = {False: 0, True: 0}
        self.current: int | None = None
        self.current_val = False

    def add(self, doc: int, ids: list[int]) -> None:
        if doc != self.current:
            self._end_document()
            self.current, self.current_val = doc, self.is_val(doc)
            self.documents[self.current_val] += 1
        self.pending[self.current_val].extend(ids)

    def _end_document(self) -> None:
        if self.current is not None:
            self.pending[self.current_val].append(self.eos_id)

    def flush(self) -> None:
        for split, writer in ((False, self.train), (True, self.val)):
            writer.write(self.pending[split])
            self.pending[split] = []

    def close(self) -> dict:
        self._end_document()
        self.flush()
        self.train.close()
        self.val.close()
        return {"train_tokens": self.train.count, "val_tokens": self.val.count,
                "train_documents": self.documents[False], "val_documents": self.documents[True],
                "val_split": "documents"}


def _write_tokens(corpus: Corpus, tokenizer: Tokenizer, out: Path, max_tokens: int | None) -> dict:
    """Encode all pieces into train.bin / val.bin in batches; returns the counts."""
    streams = _SplitStreams(out, corpus, tokenizer.eos_id)
    pieces = corpus.pieces()
    while batch := list(itertools.islice(pieces, ENCODE_BATCH_PIECES)):
        for (doc, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            streams.add(doc, ids)
        streams.flush()
        if max_tokens is not None and streams.train.count >= max_tokens:
            break
    counts = streams.close()
    if max_tokens is not None and counts["train_tokens"] > max_tokens:
        truncate_tokens(out / "train.bin", max_tokens)
        counts["train_tokens"] = max_tokens
    return counts


def _build(cfg: DataConfig, cache_dir: Path, ident: dict, key: str, out: Path) -> None:
    corpus = open_corpus(cfg, cache_dir)
    tokenizer = train_tokenizer(cfg.tokenizer, _training_texts(corpus), cfg.vocab_size)
    tokenizer.save(out)
    counts = _write_tokens(corpus, tokenizer, out, cfg.max_tokens)
    if cfg.val_fraction > 0 and counts["val_tokens"] == 0 and counts["train_tokens"] > 1:
        tail = max(1, math.ceil(cfg.val_fraction * counts["train_tokens"]))
        move_tail(out / "train.bin", out / "val.bin", tail)
        counts.update(train_tokens=counts["train_tokens"] - tail, val_tokens=tail, val_split="tail")
    qa = tokenize_pairs(corpus.qa, tokenizer)
    save_qa(qa, out / "qa.json")
    meta = {"fingerprint": key, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "qa_items": len(qa), **counts,
            "identity": ident}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
