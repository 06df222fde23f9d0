"""The data section of a run config: which corpus, which tokenizer, how to split it.

`DataConfig.from_dict(d, path="data")` builds it from YAML/JSON and raises `ConfigError`
(a `ValueError`) whose message starts with the dotted field path, e.g.
`data.facts.people: must be a positive integer, got -3` or
`data.foo: unknown key (expected one of ...)`. Direct construction does not validate;
`validate(path)` does, and `prepare_data` calls it.

Seeds: `facts.seed` decides the synthetic world (names, who has which value); `data.seed`
decides everything downstream of the corpus (facts renderings and their order, train/val
split). The loader's shuffle has its own seed (`TokenLoader(seed=...)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from memlayers.config_schema import ConfigError, from_dict, require, to_dict
from memlayers.platform.data.attributes import ATTRIBUTES, DEFAULT_ATTRIBUTES, FACTS_VERSION

SOURCES: tuple[str, ...] = ("facts", "shakespeare", "text", "jsonl", "parquet", "hub")
TOKENIZERS: tuple[str, ...] = ("byte", "word", "bpe")
FILE_SOURCES: tuple[str, ...] = ("text", "jsonl", "parquet")
PHRASINGS: tuple[str, ...] = ("prose", "terse")
DOCUMENTS: tuple[str, ...] = ("biography", "fact")

__all__ = ["ConfigError", "DataConfig", "FactsConfig", "SOURCES", "TOKENIZERS"]


# Bounds on every size a data section can name, so that validating (which builds the vocabulary of a
# word tokenizer from the rendered world) answers within seconds and nothing huge is ever started.
MAX_PEOPLE = 100_000
MAX_DOCUMENTS = 2_000_000           # people x renderings
MAX_VALUES = 100_000
MAX_VOCAB = 1_048_576
MAX_SEQ_LEN = 1_048_576


def _bounded(value: Any, most: int, path: str) -> None:
    _positive_int(value, path)
    require(value <= most, path, f"at most {most:,}, got {value:,}")


def _positive_int(value: Any, path: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    require(ok, path, f"must be a positive integer, got {value!r}")


@dataclass
class FactsConfig:
    """The synthetic biography world (see facts.py) and how much text is rendered from it."""

    people: int = 3000              # fictional people, each with a unique name
    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES  # which facts each person has
    values_per_attribute: int = 100  # size of each attribute's value list
    templates_per_attribute: int = 3  # sentence phrasings used per attribute
    renderings: int = 10            # training biographies per person (corpus size knob)
    phrasing: str = "prose"         # prose (templates) | terse ("<name> <relation> <value> .")
    name_words: int = 1             # 1: each person one word | 2: "First Last" from shared pools
    document: str = "biography"     # biography: a person's facts together | fact: one fact per document
    seed: int = 0                   # the world: names and who has which value
    version: int = FACTS_VERSION    # generator version; a config pinned to another fails

    def validate(self, path: str = "data.facts") -> None:
        for name in ("templates_per_attribute", "renderings"):
            _positive_int(getattr(self, name), f"{path}.{name}")
        _bounded(self.people, MAX_PEOPLE, f"{path}.people")
        _bounded(self.values_per_attribute, MAX_VALUES, f"{path}.values_per_attribute")
        require(self.people * self.renderings <= MAX_DOCUMENTS, f"{path}.renderings",
                f"people x renderings at most {MAX_DOCUMENTS:,}, got {self.people * self.renderings:,}")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"{path}.seed",
                f"must be an integer, got {self.seed!r}")
        require(self.version == FACTS_VERSION, f"{path}.version",
                f"this build generates facts version {FACTS_VERSION}, got {self.version!r}")
        require(self.name_words in (1, 2), f"{path}.name_words", f"must be 1 or 2, got {self.name_words!r}")
        require(self.document in DOCUMENTS, f"{path}.document",
                f"unknown document kind {self.document!r} (expected one of {', '.join(DOCUMENTS)})")
        require(self.phrasing in PHRASINGS, f"{path}.phrasing",
                f"unknown phrasing {self.phrasing!r} (expected one of {', '.join(PHRASINGS)})")
        require(self.phrasing == "prose" or self.templates_per_attribute == 1,
                f"{path}.templates_per_attribute", "the terse phrasing has one phrasing per attribute: set 1")
        attrs = self.attributes
        require(isinstance(attrs, (list, tuple)) and len(attrs) >= 1, f"{path}.attributes",
                f"must be a non-empty list of attribute names, got {attrs!r}")
        for i, name in enumerate(attrs):
            require(name in ATTRIBUTES, f"{path}.attributes[{i}]",
                    f"unknown attribute {name!r} (expected one of {', '.join(ATTRIBUTES)})")
        require(len(set(attrs)) == len(attrs), f"{path}.attributes", f"has duplicates: {list(attrs)}")
        most = min(len(ATTRIBUTES[name].templates) for name in attrs)
        require(self.templates_per_attribute <= most, f"{path}.templates_per_attribute",
                f"must be <= {most} (templates available for {', '.join(attrs)}), "
                f"got {self.templates_per_attribute}")
        for name in attrs:
            cap = ATTRIBUTES[name].max_values
            require(self.values_per_attribute <= cap, f"{path}.values_per_attribute",
                    f"must be <= {cap} for attribute {name!r}, got {self.values_per_attribute}")


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut; consumed by `prepare_data`."""

    source: str = "facts"           # facts | shakespeare | text | jsonl | parquet | hub
    path: Optional[str] = None      # text/jsonl/parquet: a file, a glob or a directory
    name: Optional[str] = None      # hub: dataset name ("owner/name")
    subset: Optional[str] = None    # hub: configuration name, if the dataset has several
    text_field: str = "text"        # jsonl/parquet/hub: the column holding the text
    tokenizer: Optional[str] = None  # byte | word | bpe; None -> "word" for facts, else "byte"
    vocab_size: int = 4096          # bpe only: target vocabulary including special tokens
    seq_len: int = 64               # tokens per training sequence (the loader packs to this)
    val_fraction: float = 0.05      # share of documents (or of renderings, or plays) held out
    seed: int = 0                   # renderings, document order, train/val split
    streaming: bool = False         # read sources without materialising them in the HF cache
    max_tokens: Optional[int] = None  # stop after this many training tokens (large corpora)
    shard_tokens: int = 4_000_000   # about this many tokens per shard of the prepared set (storage/cache unit)
    facts: FactsConfig = field(default_factory=FactsConfig)  # source facts: the synthetic world

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = "word" if self.source == "facts" else "byte"

    @classmethod
    def from_dict(cls, data: Any, path: str = "data") -> "DataConfig":
        """Build and validate from a mapping; errors name `path.field`."""
        return from_dict(cls, data, path)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, path: str = "data") -> None:
        require(self.source in SOURCES, f"{path}.source",
                f"unknown source {self.source!r} (expected one of {', '.join(SOURCES)})")
        require(self.tokenizer in TOKENIZERS, f"{path}.tokenizer",
                f"unknown tokenizer {self.tokenizer!r} (expected one of {', '.join(TOKENIZERS)})")
        if self.source in FILE_SOURCES:
            require(isinstance(self.path, str) and self.path != "", f"{path}.path",
                    f"source {self.source!r} needs a file, glob or directory")
        if self.source == "hub":
            require(isinstance(self.name, str) and self.name != "", f"{path}.name",
                    "source 'hub' needs a dataset name")
        require(isinstance(self.text_field, str) and self.text_field != "", f"{path}.text_field",
                f"must be a column name, got {self.text_field!r}")
        _bounded(self.seq_len, MAX_SEQ_LEN, f"{path}.seq_len")
        _bounded(self.vocab_size, MAX_VOCAB, f"{path}.vocab_size")
        if self.tokenizer == "bpe":
            require(self.vocab_size >= 258, f"{path}.vocab_size",
                    f"a byte-level BPE needs at least 258 entries (256 bytes, <pad>, <eos>), "
                    f"got {self.vocab_size}")
        frac = self.val_fraction
        require(isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0.0 <= frac < 1.0,
                f"{path}.val_fraction", f"must be a number in [0, 1), got {frac!r}")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"{path}.seed",
                f"must be an integer, got {self.seed!r}")
        require(isinstance(self.streaming, bool), f"{path}.streaming",
                f"must be true or false, got {self.streaming!r}")
        if self.max_tokens is not None:
            _positive_int(self.max_tokens, f"{path}.max_tokens")
        _positive_int(self.shard_tokens, f"{path}.shard_tokens")
        require(isinstance(self.facts, FactsConfig), f"{path}.facts",
                f"must be a facts section, got {type(self.facts).__name__}")
        if self.source == "facts":
            self.facts.validate(f"{path}.facts")
