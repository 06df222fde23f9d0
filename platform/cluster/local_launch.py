"""`run_local(fn, world_size)`: run `fn(rank, world_size, ...)` in processes joined by gloo on 127.0.0.1.

For tests and benchmarks of the distributed code paths on one machine. The ranks meet through a file
store in a private temporary folder rather than a TCP store (which would listen on every interface),
and gloo binds the loopback interface.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memlayers.platform.cluster.ports import loopback_interface

RUN_TIMEOUT_S = 900.0  # far above any test's or benchmark's ranks, far below gloo's own 30-minute timeout


def _entry(rank: int, fn: Callable, world_size: int, backend: str, results: str, args: tuple) -> None:
    torch.set_num_threads(1)
    interface = loopback_interface()
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    dist.init_process_group(backend, init_method=(Path(results) / "store").as_uri(), rank=rank,
                            world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(Path(results) / f"rank{rank}.pkl", "wb") as handle:
            pickle.dump(result, handle)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world_size: int, *args: Any, backend: str = "gloo",
              timeout_s: float = RUN_TIMEOUT_S) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes joined by `backend` on 127.0.0.1.

    `fn` must be importable (a module-level function); -> the ranks' return values. Workers come
    from a fork server that has torch imported (started once per process, then ~0.1 s a launch);
    where there is none, they are spawned. TimeoutError, the ranks killed, when they have not all
    finished within `timeout_s` (a rank waiting on a collective that another never joins).
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", __name__])
    with tempfile.TemporaryDirectory() as results:
        context = mp.start_processes(_entry, args=(fn, world_size, backend, results, args), nprocs=world_size,
                                     join=False, start_method=method)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=max(0.0, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"run_local({getattr(fn, '__name__', fn)}): {world_size} ranks still running "
                                   f"after {timeout_s:.0f} s; killed")
        out = []
        for rank in range(world_size):
            with open(Path(results) / f"rank{rank}.pkl", "rb") as handle:
                out.append(pickle.load(handle))  # written by our own child processes just now
        return out
