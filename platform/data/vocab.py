"""The vocabulary size a data section's tokenizer will have, which the FLOP accounting needs.

byte -> 258, bpe -> `data.vocab_size`; a word tokenizer's vocabulary is built from the corpus,
prepared into `cache_dir` (reused later) or into a temporary directory that is removed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from memlayers.platform.data.config import DataConfig
from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.data.tokenizers import ByteTokenizer


def vocab_size_of(data: DataConfig, cache_dir: Path | None = None) -> int:
    if data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if data.tokenizer == "bpe":
        return data.vocab_size
    if cache_dir is not None:
        return prepare_data(data, Path(cache_dir)).tokenizer.vocab_size
    with tempfile.TemporaryDirectory(prefix="memlayers-vocab-") as tmp:
        return prepare_data(data, Path(tmp)).tokenizer.vocab_size
