"""Tokenizers: byte-level, word-level and a byte-level BPE trained with `tokenizers`.

All three share one small interface: `vocab_size`, `pad_id`, `eos_id`, `encode(str)`,
`encode_batch(list[str])`, `decode(list[int])` (special tokens are dropped), `save(dir)`;
`load_tokenizer(kind, dir)` reads back what `save` wrote.

- byte: ids 0-255 are UTF-8 bytes, 256 = <pad>, 257 = <eos>. No files, no training.
- word: whitespace split; ids 0, 1, 2 = <pad>, <eos>, <unk>, then the training corpus's words
  sorted by frequency (most frequent first), ties by the string. `decode` joins with spaces.
- bpe: `tokenizers` BPE over a byte-level pre-tokenizer (any text encodes, no unknowns), trained
  on the training corpus to `vocab_size` entries with <pad> = 0 and <eos> = 1; saved as
  `tokenizer.json` and reloaded from it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol, Sequence

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, directory: Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; <pad> = 256, <eos> = 257."""

    kind = "byte"
    pad_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


class WordTokenizer:
    """Whitespace-separated words; <pad> = 0, <eos> = 1, <unk> = 2, then the vocabulary."""

    kind = "word"
    pad_id, eos_id, unk_id = 0, 1, 2
    FILE = "words.json"

    def __init__(self, words: Sequence[str]) -> None:
        self.words: list[str] = [PAD, EOS, UNK, *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("word tokenizer: duplicate words in the vocabulary")
        self.vocab_size = len(self.words)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "WordTokenizer":
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(text.split())
        for special in (PAD, EOS, UNK):
            counts.pop(special, None)
        return cls(sorted(counts, key=lambda w: (-counts[w], w)))

    def encode(self, text: str) -> list[int]:
        index, unk = self.index, self.unk_id
        return [index.get(w, unk) for w in text.split()]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) not in (self.pad_id, self.eos_id))

    def save(self, directory: Path) -> None:
        (directory / self.FILE).write_text(json.dumps(self.words[3:]))

    @classmethod
    def load(cls, directory: Path) -> "WordTokenizer":
        return cls(json.loads((directory / cls.FILE).read_text()))


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library; <pad> = 0, <eos> = 1."""

    kind = "bpe"
    pad_id, eos_id = 0, 1
    FILE = "tokenizer.json"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        if hf_tokenizer.token_to_id(PAD) != self.pad_id or hf_tokenizer.token_to_id(EOS) != self.eos_id:
            raise ValueError("bpe tokenizer: <pad> and <eos> must be ids 0 and 1")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer  # deferred: tokenizers is heavy and only this path needs it
        from tokenizers import (  # deferred: tokenizers is heavy and only this path needs it
            decoders,
            models,
            pre_tokenizers,
            trainers,
        )

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        self.hf.save(str(directory / self.FILE))

    @classmethod
    def load(cls, directory: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer  # deferred: tokenizers is heavy and only this path needs it

        return cls(HFTokenizer.from_file(str(directory / cls.FILE)))


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of `kind` fitted to `texts` (ignored for byte)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise ValueError(f"data.tokenizer: unknown tokenizer {kind!r}")


def load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    """Read back a tokenizer that `save(directory)` wrote."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        return WordTokenizer.load(directory)
    if kind == "bpe":
        return BPETokenizer.load(directory)
    raise ValueError(f"data.tokenizer: unknown tokenizer {kind!r}")
