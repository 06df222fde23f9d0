"""One writer per prepared set: a claim that a second preparation of the same fingerprint waits on.

On a local disk the claim is an OS file lock (`<set>.lock` beside the set), released by the kernel
when its holder dies. In a bucket it is an object `<set>/claim.json` holding its owner and a
heartbeat its holder refreshes; another preparation waits while the heartbeat is fresh and takes
the claim over when it is older than `stale_s` (a killed holder). Object stores without
conditional writes let two claimants race in the same instant; the second re-reads the object
after a settling pause and backs off when it lost, and a duplicated shard would hold the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator

from memlayers.platform.cluster.storage import join, local_path, open_fs, read_bytes, write_bytes

CLAIM = "claim.json"
HEARTBEAT_S = 5.0
STALE_S = 60.0
SETTLE_S = 1.0


@contextlib.contextmanager
def claimed(set_root: str, wait: Callable[[str], None] = lambda _: None, stale_s: float = STALE_S) -> Iterator[None]:
    """Hold the set's claim for the block; `wait(message)` is told once when another holder is seen."""
    path = local_path(set_root)
    if path is not None:
        from filelock import FileLock  # deferred: only local sets need it

        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.parent / f".{path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except TimeoutError:
            wait(f"another preparation holds {path}; waiting for it")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()
        return
    with _object_claim(set_root, wait, stale_s):
        yield


@contextlib.contextmanager
def _object_claim(set_root: str, wait: Callable[[str], None], stale_s: float) -> Iterator[None]:
    uri = join(set_root, CLAIM)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    told = False
    while True:
        raw = read_bytes(uri)
        held = json.loads(raw) if raw else None
        if held is None or held["owner"] == owner or time.time() - held["heartbeat"] > stale_s:
            write_bytes(uri, json.dumps({"owner": owner, "heartbeat": time.time()}).encode())
            time.sleep(SETTLE_S)
            raw = read_bytes(uri)
            if raw and json.loads(raw)["owner"] == owner:
                break
        elif not told:
            wait(f"another preparation ({held['owner']}) holds {set_root}; waiting for it")
            told = True
        time.sleep(HEARTBEAT_S / 2)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                write_bytes(uri, json.dumps({"owner": owner, "heartbeat": time.time()}).encode())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        fs, path = open_fs(uri)
        with contextlib.suppress(OSError):
            fs.delete_file(path)
