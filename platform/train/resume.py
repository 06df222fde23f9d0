"""Resume a run from its newest checkpoint that verifies and loads, setting aside those that do not.

A session (`worker.Session`) offers its checkpoints newest first as `Candidate`s. `resume_loop`
verifies each one's commit marker (`commit.py`) and loads it; a checkpoint refused by either is
moved aside as `<name>.bad-<reason>` (by rank 0, the one writer of a run's folder) and the one
before it is tried, so one bad file costs the steps since the previous checkpoint, never the cell.
A candidate that cannot even be opened (storage unreachable) is not judged: that error propagates
and the attempt is retried like any other failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from memlayers.platform.train.checkpoint_folder import set_aside
from memlayers.platform.train.commit import CommitError, verify_commit


class Loadable(Protocol):
    def load(self, directory: Path) -> None: ...


@dataclass(frozen=True)
class Candidate:
    """One checkpoint of a run: where it is kept, how to open it locally, how to move it aside."""
    location: str
    open: Callable[[], ContextManager[Path]]
    set_aside: Callable[[str], str]


def resume_loop(candidates: Iterable[Candidate], build: Callable[[], Loadable], rank: int,
                report_bad: Callable[[str, str], None],
                agree: Callable[[bool], bool] = lambda ok: ok) -> tuple[Loadable, Optional[str]]:
    """(a loop from `build`, loaded from the newest good candidate; that candidate's location or None).
    `report_bad(location, reason)` is told of every checkpoint refused (rank 0 then moves it aside).
    `agree(ok)`: True only if every rank loaded the candidate (`all_ranks_agree`), so that ranks whose
    shards differ all resume from the same step, and none moves a checkpoint another still reads."""
    loop = build()
    for candidate in candidates:
        with candidate.open() as directory:
            try:
                verify_commit(directory)
                loop.load(directory)
                ok, reason, detail = True, "", ""
            except Exception as error:  # a truncated or foreign file: fall back to the previous checkpoint
                ok, reason = False, error.reason if isinstance(error, CommitError) else "load"
                detail = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            if agree(ok):
                return loop, candidate.location
        reason, detail = reason or "other-rank", detail or "another rank could not load it"
        where = candidate.set_aside(reason) if rank == 0 else candidate.location
        report_bad(where, detail)
        loop = build()  # a failed load may have applied part of its state
    return loop, None


def all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """True when `ok` on every rank of the initialised process group (one all-reduce of a flag on `device`,
    the rank's own: NCCL reduces only CUDA tensors)."""
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def sibling_candidates(fs: pafs.FileSystem, latest: str,
                       opener: Callable[[str], ContextManager[Path]]) -> Iterator[Candidate]:
    """The `checkpoint_*` folders beside `latest` (Ray Train's run folder), `latest` and older, newest first."""
    parent, newest = latest.rstrip("/").rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and ".bad-" not in i.base_name
                    and i.base_name <= newest), reverse=True)
    for name in names:
        path = f"{parent}/{name}"
        yield Candidate(path, lambda path=path: opener(path), lambda reason, path=path: set_aside(fs, path, reason))
