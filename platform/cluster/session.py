"""Starting and joining Ray for the command line: a local cluster on this machine, or an address.

A local cluster (`address=None`) keeps its files under `<tmp>/memlayers-ray-<uid>` (a short
path, since Ray's socket paths are length-limited), binds 127.0.0.1, and is shut down by the
command that started it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune configuration box or tables


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> Iterator[None]:
    """Initialise Ray (joining `address`, or starting a local cluster) and shut it down after."""
    import ray  # deferred: ray is heavy and only this path needs it

    ray_env()
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level="WARNING")
    else:
        temp_dir = Path(tempfile.gettempdir()) / f"memlayers-ray-{os.getuid()}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 _temp_dir=str(temp_dir), _node_ip_address="127.0.0.1",
                 log_to_driver=not quiet, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}})
    try:
        yield
    finally:
        ray.shutdown()
