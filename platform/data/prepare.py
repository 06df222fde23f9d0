"""Prepared data for a run: the set's token streams, tokenizer and QA split, and the reference.

`prepare_data(cfg, cache_dir)` prepares the whole corpus in this process into the local set
`cache_dir/<fingerprint>/` (build.py: the same shards as a cluster preparation) and returns its
streams as int32 arrays: for tools, tests and small corpora. `open_prepared(cfg, data_root, need,
cache_dir)` opens a prepared set anywhere (a path or a bucket) as streams read through a bounded
local cache (shard_loader.py): what training reads. Both cut the same streams from the manifest
(`select`): the shortest prefix of shards holding `need` training tokens (all when None), the
training stream cut at `max_tokens`; when that leaves validation empty (e.g. a single text file),
the last `ceil(val_fraction * n)` training tokens become the validation stream instead (meta
`val_split` says which rule applied).

`reference_streams(cfg, folder)` is the single-process path the shards must equal bit for bit:
one reader over the whole corpus (sources.py), the tokenizer fitted to its first training
documents, every piece encoded in order into one train and one val stream.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from memlayers.platform.cluster.storage import join, local_path, read_bytes
from memlayers.platform.data.build import TOKENIZER_TRAIN_CHARS, Need, fetch_tokenizer, prepare_set
from memlayers.platform.data.cache import TokenWriter, read_tokens
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.identity import DATA_VERSION, fingerprint
from memlayers.platform.data.qa import QAItem, load_qa
from memlayers.platform.data.shard_loader import Segment, ShardCache, ShardStream
from memlayers.platform.data.shards import read_manifest, set_uri, shard_infos
from memlayers.platform.data.sources import Corpus, open_corpus
from memlayers.platform.data.tokenizers import Tokenizer, train_tokenizer

__all__ = ["DATA_VERSION", "PreparedData", "fingerprint", "open_prepared", "prepare_data", "reference_streams",
           "select"]


@dataclass
class PreparedData:
    """What a training worker needs: the token streams (int32 arrays or `ShardStream`s), tokenizer, QA."""

    tokenizer: Tokenizer
    train_ids: Union[np.ndarray, ShardStream]
    val_ids: Union[np.ndarray, ShardStream]
    qa: list[QAItem]
    fingerprint: str
    directory: Path | str                 # the set's folder (a path, or its URI in a bucket)
    meta: dict = field(default_factory=dict)


def _cut(segments: list[Segment], lo: int, hi: int) -> list[Segment]:
    """The segments covering tokens [lo, hi) of the stream they make."""
    out, at = [], 0
    for seg in segments:
        a, b = max(lo, at), min(hi, at + len(seg))
        if a < b:
            out.append(Segment(seg.shard, seg.base, seg.start + a - at, seg.start + b - at))
        at += len(seg)
    return out


def select(manifest: dict, need: Optional[int], max_tokens: Optional[int], val_fraction: float
           ) -> tuple[list[Segment], list[Segment], dict]:
    """(train segments, val segments, counts) of the streams a run reads (see the module docstring)."""
    infos = shard_infos(manifest)
    if need is not None:
        total = 0
        for k, info in enumerate(infos):
            total += info.train_tokens
            if total >= need:
                infos = infos[:k + 1]
                break
    train = [Segment(i.index, 0, 0, i.train_tokens) for i in infos]
    val = [Segment(i.index, i.train_tokens, 0, i.val_tokens) for i in infos]
    n_train = sum(i.train_tokens for i in infos)
    if max_tokens is not None and n_train > max_tokens:
        train, n_train = _cut(train, 0, max_tokens), max_tokens
    n_val = sum(i.val_tokens for i in infos)
    counts = {"train_tokens": n_train, "val_tokens": n_val, "shards_read": len(infos), "val_split": "documents",
              "train_documents": sum(i.train_documents for i in infos),
              "val_documents": sum(i.val_documents for i in infos)}
    if val_fraction > 0 and n_val == 0 and n_train > 1:
        tail = max(1, math.ceil(val_fraction * n_train))
        train, val = _cut(train, 0, n_train - tail), _cut(train, n_train - tail, n_train)
        counts.update(train_tokens=n_train - tail, val_tokens=tail, val_split="tail")
    return train, val, counts


def _qa(set_root: str) -> list[QAItem]:
    raw = read_bytes(join(set_root, "qa.json"))
    if raw is None:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "qa.json").write_bytes(raw)
        return load_qa(Path(tmp) / "qa.json")


def open_prepared(cfg: DataConfig, data_root: str, need: Optional[int], cache_dir: Path,
                  manifest: Optional[dict] = None, cache_bytes: Optional[int] = None) -> PreparedData:
    """The streams of the prepared set of `cfg` under `data_root` that a run needing `need` training
    tokens reads, through a shard cache in `cache_dir` (bounded by `cache_bytes`)."""
    key = manifest["fingerprint"] if manifest else fingerprint(cfg)
    set_root = set_uri(str(data_root), key)
    manifest = manifest or read_manifest(set_root)
    if manifest is None:
        raise FileNotFoundError(f"data: no prepared set at {set_root} (run `memlayers data prepare`)")
    train, val, counts = select(manifest, need, cfg.max_tokens, cfg.val_fraction)
    cache = ShardCache(set_root, np.dtype(manifest["dtype"]), shard_infos(manifest),
                       Path(cache_dir) / key if local_path(set_root) is None else None, cache_bytes)
    tokenizer = fetch_tokenizer(manifest["tokenizer"], set_root, Path(cache_dir) / key / "tokenizer")
    assert tokenizer is not None, f"data: the tokenizer of {set_root} is missing"
    meta = {**{k: v for k, v in manifest.items() if k != "shards"}, **counts}
    return PreparedData(tokenizer, ShardStream(cache, train), ShardStream(cache, val), _qa(set_root), key,
                        local_path(set_root) or set_root, meta)


def prepare_data(cfg: DataConfig, cache_dir: Path, need: Need = None) -> PreparedData:
    """Prepare the corpus of `cfg` in this process into `cache_dir`; its streams read into int32 arrays."""
    root = str(Path(cache_dir).resolve())
    manifest = prepare_set(cfg, root, need, out=lambda _: None, hf_cache=Path(cache_dir) / "hf")
    need_tokens = need(manifest["vocab_size"]) if callable(need) else need
    data = open_prepared(cfg, root, need_tokens, Path(cache_dir), manifest)
    data.train_ids = np.asarray(data.train_ids, dtype=np.int32)
    data.val_ids = np.asarray(data.val_ids, dtype=np.int32)
    return data


# ---- the single-process reference ---------------------------------------------------------------
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
        self.current: int | None = None
        self.current_val = False

    def add(self, doc: int, ids: list[int]) -> None:
        if doc != self.current:
            if self.current is not None:
                self.pending[self.current_val].append(self.eos_id)
            self.current, self.current_val = doc, self.is_val(doc)
        self.pending[self.current_val].extend(ids)

    def flush(self) -> None:
        for split, writer in ((False, self.train), (True, self.val)):
            writer.write(self.pending[split])
            self.pending[split] = []

    def close(self) -> None:
        if self.current is not None:
            self.pending[self.current_val].append(self.eos_id)
        self.flush()
        self.train.close()
        self.val.close()


def reference_streams(cfg: DataConfig, folder: Path, batch_pieces: int = 1000, tokenizer: Optional[Tokenizer] = None
                      ) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """(tokenizer, train ids, val ids) of the whole corpus by one process (see the module docstring);
    `tokenizer`: one already trained (the fit is skipped, e.g. to time the encoding alone)."""
    cfg.validate()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = open_corpus(cfg, folder)
    tokenizer = tokenizer or train_tokenizer(cfg.tokenizer, _training_texts(corpus), cfg.vocab_size)
    streams = _SplitStreams(folder, corpus, tokenizer.eos_id)
    pieces = corpus.pieces()
    while batch := list(itertools.islice(pieces, batch_pieces)):
        for (doc, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
            streams.add(doc, ids)
        streams.flush()
    streams.close()
    return tokenizer, read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin")
