"""A prepared set's tokenizer in storage: the files each kind saves, written beside the set's shards
and read back (copied out of a bucket first) by whoever tokenizes or trains on the set."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from memlayers.platform.cluster.storage import join, local_path, read_bytes
from memlayers.platform.data.shards import publish_bytes
from memlayers.platform.data.tokenizers import Tokenizer, load_tokenizer

TOKENIZER_FILES = {"byte": (), "word": ("words.json",), "bpe": ("tokenizer.json",)}


def save_tokenizer(tokenizer: Tokenizer, set_root: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(Path(tmp))
        for name in TOKENIZER_FILES[tokenizer.kind]:
            publish_bytes(join(set_root, name), (Path(tmp) / name).read_bytes())


def fetch_tokenizer(kind: str, set_root: str, local_dir: Path) -> Optional[Tokenizer]:
    """The set's stored tokenizer (copied into `local_dir` from a bucket), None if not stored yet."""
    folder = local_path(set_root)
    if folder is None:
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES[kind]:
            raw = read_bytes(join(set_root, name))
            if raw is None:
                return None
            (local_dir / name).write_bytes(raw)
        folder = local_dir
    if not all((folder / name).is_file() for name in TOKENIZER_FILES[kind]):
        return None
    return load_tokenizer(kind, folder)
