"""A run's checkpoints in a storage folder of its own, for a loop that runs without Ray Train.

`CheckpointFolder(uri)` keeps `checkpoint_<step:08d>/` folders under `uri` (a local path, or any
storage URI: s3://, gs://, ... through `cluster/storage.py`). A checkpoint counts once its commit
marker (`commit.py`) is there: locally the folder is copied into a staging folder beside its final
name, fsynced and renamed into place; remotely every other file is uploaded first and the marker
last. `open(step)` opens one as a local folder (downloaded for a remote root); `add()` keeps the
newest `keep`; `set_aside(step, reason)` moves a checkpoint that failed to load out of the way.

A staging folder is named after its writer (`.staging-<pid>-<process start>-<random>-<host>`): a
writer removes another's staging folder only when that writer is provably gone (same host and
its process dead or another process under its pid), or when it is older than `STALE_STAGING_S`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import psutil
import pyarrow.fs as pafs

from memlayers.platform.cluster import storage
from memlayers.platform.train.commit import COMMIT, aside_name, fsync_dir, fsync_tree, is_marker

NAME_RE = re.compile(r"^checkpoint_(\d{8})$")
STAGING = ".staging-"
STALE_STAGING_S = 24 * 3600.0  # a copy that has run this long on another host is taken as dead


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


@dataclass(frozen=True)
class StagingOwner:
    """Who writes a staging folder: its process (pid and start time, to tell a reused pid) and host."""
    pid: int
    started: int  # the process's start time, whole seconds since the epoch
    host: str

    @staticmethod
    def current() -> "StagingOwner":
        return StagingOwner(os.getpid(), int(psutil.Process().create_time()), socket.gethostname())

    def prefix(self) -> str:
        return f"{STAGING}{self.pid}-{self.started}-"

    def suffix(self) -> str:
        return f"-{self.host}"

    @staticmethod
    def parse(name: str) -> Optional["StagingOwner"]:
        parts = name[len(STAGING):].split("-", 3) if name.startswith(STAGING) else []
        if len(parts) != 4 or not (parts[0].isdigit() and parts[1].isdigit()):
            return None
        return StagingOwner(int(parts[0]), int(parts[1]), parts[3])

    def alive(self) -> bool:
        """False only when this host can prove it: the process is gone or its pid now names another."""
        if self.host != socket.gethostname():
            return True
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) <= 1
        except psutil.NoSuchProcess:
            return False


def abandoned(staging: Path, now: Optional[float] = None) -> bool:
    """A staging folder whose writer is gone (or that nobody has touched for `STALE_STAGING_S`)."""
    owner = StagingOwner.parse(staging.name)
    try:
        age = (now or time.time()) - staging.stat().st_mtime
    except FileNotFoundError:
        return False  # its writer renamed it into place meanwhile
    return age > STALE_STAGING_S or (owner is not None and not owner.alive())


def set_aside(fs: pafs.FileSystem, path: str, reason: str) -> str:
    """Move the checkpoint folder `path` of `fs` to `<name>.bad-<reason>` beside it; returns the new path."""
    parent, name = path.rstrip("/").rsplit("/", 1)
    target = f"{parent}/{aside_name(name, reason)}"
    if isinstance(fs, pafs.LocalFileSystem):
        if Path(target).exists():
            shutil.rmtree(target)
        os.replace(path, target)
        fsync_dir(Path(parent))
        return target
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    for info in infos:  # an object store has no rename: copy, then delete
        if info.type == pafs.FileType.File:
            fs.copy_file(info.path, target + info.path[len(path.rstrip("/")):])
    fs.delete_file(f"{path}/{COMMIT}")  # unlisted first, so no reader picks it up half deleted
    fs.delete_dir(path)
    return target


class CheckpointFolder:
    def __init__(self, uri: str, keep: int = 2) -> None:
        self.uri, self.keep = uri, keep
        self.local = storage.local_path(uri)

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first."""
        found = set()
        for relative in storage.list_files(self.uri):
            parts = relative.split("/")
            match = NAME_RE.match(parts[0])
            if match and parts[1:] == [COMMIT]:
                found.add(int(match.group(1)))
        return sorted(found)

    def location(self, step: int) -> str:
        """Where the checkpoint of `step` is kept (a local path or a URI): the run's `checkpoint` tag."""
        return storage.join(self.uri, checkpoint_name(step))

    def add(self, step: int, directory: Path) -> str:
        """Keep the checkpoint written (and committed) into the local `directory` as the one of `step`."""
        if self.local is not None:
            self._add_local(step, Path(directory))
        else:
            files = [p for p in Path(directory).rglob("*") if p.is_file()]
            for path in sorted(files, key=lambda p: (is_marker(p.name), p.name == COMMIT, p)):  # the marker last
                storage.upload(path, storage.join(self.location(step), *path.relative_to(directory).parts))
        for old in self.steps()[:-self.keep]:
            self._remove(old)
        return self.location(step)

    def _add_local(self, step: int, directory: Path) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        target = self.local / checkpoint_name(step)
        owner = StagingOwner.current()
        staging = Path(tempfile.mkdtemp(dir=self.local, prefix=owner.prefix(), suffix=owner.suffix()))
        shutil.copytree(directory, staging, dirs_exist_ok=True)
        fsync_tree(staging)
        if target.exists():  # a replayed step after a restart: the new one replaces it
            shutil.rmtree(target)
        staging.rename(target)
        fsync_dir(self.local)
        for other in self.local.glob(f"{STAGING}*"):  # a writer killed mid-copy left it
            if abandoned(other):
                shutil.rmtree(other, ignore_errors=True)

    def _remove(self, step: int) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / checkpoint_name(step), ignore_errors=True)
            return
        fs, path = storage.open_fs(self.location(step))
        fs.delete_dir(path)

    def set_aside(self, step: int, reason: str) -> str:
        """Move the checkpoint of `step` to `<name>.bad-<reason>` (no longer listed); returns where."""
        fs, path = storage.open_fs(self.location(step))
        aside = set_aside(fs, path, reason)
        return aside if self.local is not None else storage.join(self.uri, aside.rsplit("/", 1)[1])

    @contextlib.contextmanager
    def open(self, step: int) -> Iterator[Path]:
        """The checkpoint of `step` as a local folder, while open."""
        if self.local is not None:
            yield self.local / checkpoint_name(step)
            return
        source = self.location(step)
        with tempfile.TemporaryDirectory(prefix="memlayers-checkpoint-") as tmp:
            for relative in storage.list_files(source):
                storage.download(storage.join(source, relative), Path(tmp).joinpath(*relative.split("/")))
            yield Path(tmp)
