"""A run's checkpoints in a storage folder of its own, for a loop that runs without Ray Train.

`CheckpointFolder(uri)` keeps `checkpoint_<step:08d>/` folders under `uri` (a local path, or any
storage URI: s3://, gs://, ... through `cluster/storage.py`). A checkpoint is complete once its
`meta.json` exists: locally the folder is written beside its final name and renamed into place;
remotely every other file is uploaded first and `meta.json` last. A staging folder left by a
writer killed mid-copy is removed by the next local `add()`. `open(step)` opens one as a
local folder (downloaded for a remote root); `add()` keeps the newest `keep`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from memlayers.platform.cluster import storage

NAME_RE = re.compile(r"^checkpoint_(\d{8})$")
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


class CheckpointFolder:
    def __init__(self, uri: str, keep: int = 2) -> None:
        self.uri, self.keep = uri, keep
        self.local = storage.local_path(uri)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        found = set()
        for relative in storage.list_files(self.uri):
            parts = relative.split("/")
            match = NAME_RE.match(parts[0])
            if match and parts[1:] == [META]:
                found.add(int(match.group(1)))
        return sorted(found)

    def location(self, step: int) -> str:
        """Where the checkpoint of `step` is kept (a local path or a URI): the run's `checkpoint` tag."""
        return storage.join(self.uri, checkpoint_name(step))

    def add(self, step: int, directory: Path) -> str:
        """Keep the checkpoint written into the local `directory` as the one of `step`; returns its location."""
        if self.local is not None:
            self._add_local(step, Path(directory))
        else:
            files = [p for p in Path(directory).rglob("*") if p.is_file()]
            for path in sorted(files, key=lambda p: (p.name == META, p)):  # meta.json last: it marks completion
                storage.upload(path, storage.join(self.location(step), *path.relative_to(directory).parts))
        for old in self.steps()[:-self.keep]:
            self._remove(old)
        return self.location(step)

    def _add_local(self, step: int, directory: Path) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        target = self.local / checkpoint_name(step)
        staging = Path(tempfile.mkdtemp(dir=self.local, prefix=".staging-"))
        shutil.copytree(directory, staging, dirs_exist_ok=True)
        if target.exists():  # a replayed step after a restart: the new one replaces it
            shutil.rmtree(target)
        staging.rename(target)
        # a run's attempts write one at a time: any other staging folder is a killed writer's leftover
        for stale in self.local.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _remove(self, step: int) -> None:
        if self.local is not None:
            shutil.rmtree(self.local / checkpoint_name(step), ignore_errors=True)
            return
        fs, path = storage.open_fs(self.location(step))
        fs.delete_dir(path)

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
