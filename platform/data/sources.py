"""Corpora: every source seen as numbered documents made of text pieces, plus a split rule.

`open_corpus(cfg, cache_dir)` returns a `Corpus`: `pieces()` yields `(doc_id, text)` in a fixed
order (a document may come in several pieces, e.g. a text file line by line, and ends where the
next doc id starts), `is_val(doc_id)` says which split a document belongs to, and `qa` holds the
question/answer pairs when the source has them (synthetic facts only).

- facts: biographies from facts.py; documents 0.. are training renderings, the rest held-out
  renderings (`max(1, round(val_fraction * renderings))` of them when val_fraction > 0).
- shakespeare: one document per play, split by play (shakespeare.py).
- text / jsonl / parquet: local files through `datasets.load_dataset("text"|"json"|"parquet",
  data_files=..., streaming=cfg.streaming)`; `path` is a file, a glob or a directory (files with
  the source's extensions, recursively), in sorted order. A text file is one document (its lines,
  line breaks kept); a JSONL/parquet row is one document (`text_field`).
- hub: `datasets.load_dataset(name, subset, split="train", streaming=...)`; rows are documents.
  Offline (HF_HUB_OFFLINE=1) an uncached name fails at once with a `data.name: ...` error.
For these four a document goes to validation when a seeded hash of its number falls below
`val_fraction`, so the split needs no count of the documents and is the same when streaming
(prepare.py falls back to a tail split when that leaves validation empty).
"""

from __future__ import annotations

import glob
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from memlayers.config_schema import ConfigError
from memlayers.platform.data import facts as facts_mod
from memlayers.platform.data import shakespeare
from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.draws import unit

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "text": (".txt", ".text", ".md"),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
}
LOADERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
ROWS_PER_BATCH = 1000
SAMPLE_BYTES = 1 << 20


@dataclass
class Corpus:
    pieces: Callable[[], Iterator[tuple[int, str]]]
    is_val: Callable[[int], bool]
    qa: list[facts_mod.QAPair] = field(default_factory=list)


def hashed_split(seed: int, val_fraction: float) -> Callable[[int], bool]:
    """Document -> validation iff a seeded hash of its number, in [0, 1), is below val_fraction."""
    return lambda doc: unit(seed, "split", doc) < val_fraction


def resolve_files(cfg: DataConfig) -> list[Path]:
    """The files `cfg.path` names (file, glob or directory), sorted; at least one."""
    raw = str(Path(cfg.path).expanduser())
    if any(c in raw for c in "*?["):
        files = [Path(p) for p in glob.glob(raw, recursive=True)]
    elif Path(raw).is_dir():
        files = [p for p in Path(raw).rglob("*")
                 if p.suffix in EXTENSIONS[cfg.source] and not any(part.startswith(".") for part in p.parts)]
    else:
        files = [Path(raw)] if Path(raw).exists() else []
    files = sorted(p.resolve() for p in files if p.is_file())
    if not files:
        raise ConfigError("data.path", f"no {cfg.source} files match {cfg.path!r}")
    return files


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets  # deferred: datasets is heavy and only this path needs it
    from datasets.utils import logging as hf_logging  # deferred: datasets is heavy and only this path needs it

    was_disabled = datasets.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.enable_progress_bars()


def _rows(dataset, text_field: str, where: str) -> Iterator[str]:
    for batch in dataset.iter(batch_size=ROWS_PER_BATCH):
        if text_field not in batch:
            raise ConfigError("data.text_field", f"column {text_field!r} not in {where} "
                                                 f"(columns: {', '.join(sorted(batch))})")
        for text in batch[text_field]:
            yield text if isinstance(text, str) else ""


def _file_pieces(cfg: DataConfig, files: list[Path], hf_cache: Path) -> Iterator[tuple[int, str]]:
    import datasets  # deferred: datasets is heavy and only this path needs it

    with _quiet_datasets():
        if cfg.source == "text":
            for doc, path in enumerate(files):
                try:
                    ds = datasets.load_dataset("text", data_files=[str(path)], split="train", keep_linebreaks=True,
                                               streaming=cfg.streaming, cache_dir=str(hf_cache))
                except Exception as error:
                    raise ConfigError("data.path", f"cannot read {path} as text: {error}") from error
                for line in _rows(ds, "text", str(path)):
                    yield doc, line
            return
        try:
            ds = datasets.load_dataset(LOADERS[cfg.source], data_files=[str(p) for p in files], split="train",
                                       streaming=cfg.streaming, cache_dir=str(hf_cache))
        except Exception as error:
            raise ConfigError("data.path", f"cannot read {cfg.path!r} as {cfg.source}: {error}") from error
        for doc, text in enumerate(_rows(ds, cfg.text_field, repr(cfg.path))):
            yield doc, text


def _hub_pieces(cfg: DataConfig, hf_cache: Path) -> Iterator[tuple[int, str]]:
    import datasets  # deferred: datasets is heavy and only this path needs it

    with _quiet_datasets():
        try:
            ds = datasets.load_dataset(cfg.name, cfg.subset, split="train", streaming=cfg.streaming,
                                       cache_dir=str(hf_cache))
            rows = _rows(ds, cfg.text_field, repr(cfg.name))
            first = next(rows, None)
        except ConfigError:
            raise
        except Exception as error:
            raise ConfigError("data.name", f"cannot load {cfg.name!r} from the Hugging Face hub "
                                           f"(offline? HF_HUB_OFFLINE=1): {error}") from error
        if first is None:
            return
        yield 0, first
        for doc, text in enumerate(rows, start=1):
            yield doc, text


def _facts_corpus(cfg: DataConfig) -> Corpus:
    world = facts_mod.generate_world(cfg.facts)
    n_train = cfg.facts.renderings
    n_val = max(1, round(cfg.val_fraction * n_train)) if cfg.val_fraction > 0 else 0
    n_docs = facts_mod.documents_per_rendering(world) * n_train
    docs = list(facts_mod.documents(world, cfg.seed, range(n_train + n_val)))  # read twice: render once
    return Corpus(lambda: enumerate(docs), lambda doc: doc >= n_docs, facts_mod.qa_pairs(world, cfg.seed))


def _shakespeare_corpus(cfg: DataConfig) -> Corpus:
    plays = shakespeare.plays()
    _, val = shakespeare.split_plays(plays, cfg.val_fraction, cfg.seed)
    val_docs = {i for i, nt in enumerate(plays) if nt in val}
    return Corpus(lambda: ((i, text) for i, (_, text) in enumerate(plays)), val_docs.__contains__)


def open_corpus(cfg: DataConfig, cache_dir: Path) -> Corpus:
    """The corpus `cfg` describes (see the module docstring)."""
    if cfg.source == "facts":
        return _facts_corpus(cfg)
    if cfg.source == "shakespeare":
        return _shakespeare_corpus(cfg)
    hf_cache = cache_dir / "hf"
    split = hashed_split(cfg.seed, cfg.val_fraction)
    if cfg.source == "hub":
        return Corpus(lambda: _hub_pieces(cfg, hf_cache), split)
    files = resolve_files(cfg)
    return Corpus(lambda: _file_pieces(cfg, files, hf_cache), split)
