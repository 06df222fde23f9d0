"""Starting and joining Ray for the command line: a local cluster on this machine, or an address.

A local cluster (`address=None`) is private to the user who starts it:
- it binds loopback only (GCS, raylet, object manager, workers, agents, dashboard): Ray takes
  127.0.0.1 as the node's address while its switch for single-machine clusters is off
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`, read at import: set on the module for the start only), and
  every server of the session binds the node's address; gloo's pairs bind the loopback interface
  (GLOO_SOCKET_IFNAME in the workers' environment). Not covered: the rendezvous store of a
  multi-worker Ray Train cell (torch's TCPStore binds every interface and takes no bind address);
- it keeps its files under `<tmp>/memlayers-ray-<uid>/ray` (a short path, since Ray's socket paths are
  length-limited); the outer folder is created 0700 and refused when another user owns it or others
  may write to it (they could replace its sockets or read its logs); Ray makes its own folder
  world-writable (for clusters shared by several users), which the private outer folder keeps closed;
- its token (Ray enables token authentication for local clusters) is `~/.ray/auth_token`, written
  0600 before Ray would write it world-readable.
It is shut down by the command that started it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from memlayers.platform.cluster.ports import LOOPBACK, loopback_interface

GLOO_ENV = "GLOO_SOCKET_IFNAME"


class UnsafeSessionDir(RuntimeError):
    """The local cluster's folder is not private to this user; the message says why, in one line."""


def ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune configuration box or tables


def session_dir(root: Path | None = None, create: bool = True) -> Path:
    """`<tmp>/memlayers-ray-<uid>`, created 0700 (tightened to 0700 if it is only readable by others);
    UnsafeSessionDir if it is not a directory of this user's or others may write to it. With
    `create=False` a folder that does not exist yet passes (a check before anything is started)."""
    path = Path(root or tempfile.gettempdir()) / f"memlayers-ray-{os.getuid()}"
    if not create and not os.path.lexists(path):
        return path
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeSessionDir(f"{path} is not a directory (a link or a file): remove it, or set TMPDIR to "
                               f"a folder of your own")
    if info.st_uid != os.getuid():
        raise UnsafeSessionDir(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()}): its owner "
                               f"could read or replace the local cluster's sockets and logs; remove it, or set "
                               f"TMPDIR to a folder of your own")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeSessionDir(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): they could "
                               f"replace the local cluster's sockets; remove it, or chmod 700 it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def session_dir_problem(address: str | None) -> str | None:
    """Why a local cluster cannot start in this user's private folder (checked before anything starts,
    creating nothing), or None; a joined cluster (`address`) needs no local folder."""
    if address:
        return None
    try:
        session_dir(create=False)
    except UnsafeSessionDir as error:
        return str(error)
    return None


def private_token() -> Path | None:
    """Make the token a new local cluster uses readable by this user only: write `~/.ray/auth_token` 0600
    when no token is set up yet (Ray would write it with the default umask, world-readable), or tighten a
    token file of this user's. None when token authentication is switched off or the token is given
    in the environment."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(given).expanduser() if given else Path.home() / ".ray" / "auth_token"
    if not given:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))  # the entropy and form of Ray's own tokens
    with contextlib.suppress(FileNotFoundError):
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, 0o600)
    return path


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Within: a Ray started in this process takes 127.0.0.1 as its node's address, which it hands to every
    process it starts, so that their servers bind loopback. Nothing is left in the environment, so that
    other programs started from this process (`ray start` of another node, a driver joining a real
    cluster) are unaffected; the setting is undone after."""
    import ray._private.ray_constants as constants  # Ray's switch for single-machine clusters, read at import

    previous = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = previous


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> Iterator[None]:
    """Initialise Ray (joining `address`, or starting a private local cluster) and shut it down after."""
    import ray  # deferred: ray is heavy and only this path needs it

    ray_env()
    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level="WARNING")
    else:
        temp_dir = session_dir() / "ray"
        private_token()
        worker_env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
        interface = os.environ.get(GLOO_ENV) or loopback_interface()
        if interface:
            worker_env[GLOO_ENV] = interface  # gloo's pairs of this machine's ranks bind loopback too
        with loopback_node():
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     _temp_dir=str(temp_dir), _node_ip_address=LOOPBACK, log_to_driver=not quiet,
                     logging_level="WARNING", runtime_env={"env_vars": worker_env})
    try:
        yield
    finally:
        ray.shutdown()
