"""Checkpoints: one `state.pt` per rank-file, written atomically, loaded with weights_only=True.

A checkpoint directory holds `state-rank{r}.pt` files (rank 0 always; other ranks only when
they own state of their own, e.g. value-table shards) and `meta.json` (step, world size).
Writes go to a temporary file in the same directory, fsynced and renamed into place, so a worker
killed mid-write never leaves a truncated file; the folder counts once its commit marker is written
(`commit.py`), and `load_state` is what a resume, an evaluation or a finetune reads it with.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from memlayers.platform.cluster.storage import write_local_atomic
from memlayers.platform.train.commit import fsync_dir


def state_file(directory: Path, rank: int = 0) -> Path:
    return Path(directory) / f"state-rank{rank}.pt"


def atomic_save(payload: Any, target: Path) -> Path:
    """torch.save `payload` to `target` through a temporary file beside it, fsynced, then renamed;
    streamed to the file (`storage.write_local_atomic` would hold a large state's bytes twice)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def save_state(state: dict[str, Any], directory: Path, rank: int = 0, meta: dict | None = None) -> Path:
    """Atomically write `state` (tensors, numbers, strings, nested dicts/lists) for `rank`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = atomic_save(state, state_file(directory, rank))
    if meta is not None and rank == 0:
        write_local_atomic(directory / "meta.json", json.dumps(meta).encode())
    return target


def load_state(directory: Path, rank: int = 0, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a rank's state safely (no pickled code: weights_only=True)."""
    return torch.load(state_file(directory, rank), map_location=map_location, weights_only=True)

