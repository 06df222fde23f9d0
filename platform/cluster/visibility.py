"""Can every node of the Ray cluster see a path on this node's disk? A marker decides, not a guess.

`unseen_from(folder)` writes a marker file with a random token into `folder` and runs one zero-CPU
task per alive node, pinned there with `NodeAffinitySchedulingStrategy`, that reads it back; it
returns the nodes that could not. `shared_problems(tracking_uri, storage_root)` applies that to a
run's settings on a cluster of more than one node: a `sqlite:///` store or a local storage path
that some node cannot see is a ConfigError naming `tracking.uri` or `storage` and what to use
instead. On one node nothing is checked.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from memlayers.config_schema import ConfigError
from memlayers.platform.cluster.storage import local_path
from memlayers.platform.tracking.conventions import sqlite_path

TRACKING_HINT = ("use an MLflow tracking server every node reaches (tracking.uri: http://HOST:5000, started with "
                 "`mlflow server --host 0.0.0.0 --artifacts-destination s3://BUCKET/mlartifacts`)")
STORAGE_HINT = "use storage: s3://BUCKET/PREFIX (or gs://..., or a path every node mounts)"


@ray.remote(num_cpus=0, max_retries=0)
def _read_marker(path: str) -> Optional[str]:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def alive_nodes() -> list[dict]:
    """The cluster's alive nodes (`ray.nodes()` entries); Ray must be initialised."""
    return [node for node in ray.nodes() if node.get("Alive")]


def _describe(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:8]})"


def unseen_from(folder: Path, timeout: float = 120.0) -> list[str]:
    """The alive nodes that cannot read a marker written into `folder` here (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    marker = folder / f".memlayers-visible-{token[:12]}"
    marker.write_text(token)
    try:
        nodes = alive_nodes()
        refs = [_read_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(str(marker)) for node in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(ready)
        unseen = []
        for node, ref in zip(nodes, refs):
            if ref not in done:
                unseen.append(f"{_describe(node)}: no answer in {timeout:.0f} s")
                ray.cancel(ref, force=True)
                continue
            try:
                seen = ray.get(ref) == token
            except Exception as error:  # a node that died meanwhile cannot see it either
                seen, error_text = False, f"{type(error).__name__}"
                unseen.append(f"{_describe(node)}: {error_text}")
                continue
            if not seen:
                unseen.append(_describe(node))
        return unseen
    finally:
        marker.unlink(missing_ok=True)


def shared_problems(tracking_uri: str, storage_root: str) -> list[ConfigError]:
    """On a cluster of more than one node: the settings some node cannot reach (empty on one node)."""
    nodes = alive_nodes()
    if len(nodes) <= 1:
        return []
    problems = []
    db = sqlite_path(tracking_uri)
    if db is not None:
        unseen = unseen_from(db.resolve().parent)
        if unseen:
            problems.append(ConfigError("tracking.uri", f"{tracking_uri} is a file on this node that {len(unseen)} of "
                                        f"the cluster's {len(nodes)} nodes cannot see ({', '.join(unseen)}); "
                                        f"{TRACKING_HINT}"))
    folder = local_path(storage_root)
    if folder is not None:
        unseen = unseen_from(folder)
        if unseen:
            problems.append(ConfigError("storage", f"{folder} is on this node's disk and {len(unseen)} of the "
                                        f"cluster's {len(nodes)} nodes cannot see it ({', '.join(unseen)}); "
                                        f"{STORAGE_HINT}"))
    return problems
