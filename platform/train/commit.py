"""Commit markers: a checkpoint folder counts only once its marker says which files it holds.

A writer puts its files in a folder, fsyncs them, then writes `commit.json` last: each file's
size and SHA-256. `verify_commit(folder)` re-reads the files against every marker in the folder
and names what is wrong, so a truncated or half-copied checkpoint is refused before it is loaded.
A folder written by several writers (ranks of one checkpoint, a distributed-checkpoint writer)
carries one marker per writer: writer 0's `commit.json`, which must be there, and
`commit-rank{r}.json` of the others. A refused checkpoint is set aside as `<name>.bad-<reason>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional

COMMIT = "commit.json"
MARKER_RE = re.compile(r"^commit(-rank\d+)?\.json$")
FORMAT = 1


class CommitError(Exception):
    """A checkpoint folder that must not be loaded; `reason` is a short slug for its set-aside name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def marker_name(writer: int = 0) -> str:
    return COMMIT if writer == 0 else f"commit-rank{writer}.json"


def is_marker(name: str) -> bool:
    return MARKER_RE.match(name) is not None


def aside_name(name: str, reason: str) -> str:
    """`checkpoint_00000020.bad-checksum`: where a refused checkpoint is moved."""
    return f"{name}.bad-{re.sub(r'[^A-Za-z0-9_.]+', '-', reason).strip('-') or 'unknown'}"


def digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new names, renames) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; their renames are durable already
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, the folder itself last."""
    folder = Path(folder)
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def write_commit_marker(folder: Path, files: Optional[Iterable[Path | str]] = None, writer: int = 0) -> Path:
    """Mark `folder` complete: fsync `files` (paths relative to it; default every non-marker file in
    it), then write the marker of `writer` atomically and fsync the folder. Call it last."""
    folder = Path(folder)
    if files is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and not is_marker(p.name))
    else:
        names = sorted(Path(f).as_posix() for f in files)
    entries = {}
    for name in names:
        path = folder / name
        fsync_file(path)
        entries[name] = {"size": path.stat().st_size, "sha256": digest(path)}
    for sub in {(folder / n).parent for n in names}:
        fsync_dir(sub)
    target = folder / marker_name(writer)
    tmp = folder / f".{target.name}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"format": FORMAT, "writer": writer, "files": entries}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    fsync_dir(folder)
    return target


def verify_commit(folder: Path) -> list[str]:
    """The files `folder`'s markers vouch for; raises CommitError (reason: no-commit, bad-marker,
    missing, size, checksum) when writer 0's marker is absent or any file does not match."""
    folder = Path(folder)
    if not (folder / COMMIT).is_file():
        raise CommitError("no-commit", f"{folder} has no {COMMIT}")
    vouched = []
    for marker in sorted(p for p in folder.iterdir() if is_marker(p.name)):
        try:
            files = json.loads(marker.read_text())["files"]
            items = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CommitError("bad-marker", f"{marker} cannot be read: {error}") from error
        for name, size, sha in items:
            path = folder / name
            if not path.is_file():
                raise CommitError("missing", f"{path} is listed in {marker.name} but absent")
            if path.stat().st_size != size:
                raise CommitError("size", f"{path} holds {path.stat().st_size} bytes, {marker.name} says {size}")
            if digest(path) != sha:
                raise CommitError("checksum", f"{path} does not match the checksum in {marker.name}")
            vouched.append(name)
    return vouched
