"""One controller per study: a second one is refused with one line naming the holder and starts
nothing; a killed holder's lock is free at once and its lease once its heartbeat is stale.

Real processes (the holder is a subprocess killed with SIGKILL), a real SQLite MLflow store, and for
the end-to-end case the real `memlayers study run` CLI against a study running on a local Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO_ROOT

from memlayers.platform.study.lease import Holder, Lease, StudyLocked, file_lock
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import run_tags, sqlite_uri

HOLD = """
import sys, time
from pathlib import Path
from memlayers.platform.study.lease import Holder, Lease, file_lock
workdir, uri, run_id = sys.argv[1:4]
me = Holder.me()
with file_lock("held", Path(workdir), me), Lease("held", uri, run_id, me, heartbeat_s=0.2, settle_s=0.1,
                                                 out=lambda line: None):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_live_holder_is_refused_by_name_and_a_killed_ones_lock_and_lease_are_taken_over(tmp_path):
    uri = sqlite_uri(tmp_path)
    parent = tracking.create_run(uri, tracking.ensure_experiment(uri, "held", tmp_path / "art"), "held",
                                 run_tags("study", "held"))
    workdir = tmp_path / "wd"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), uri, parent], stdout=subprocess.PIPE,
                              start_new_session=True)
    me = Holder.me()
    lease = Lease("held", uri, parent, me, stale_s=3.0, settle_s=0.1)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(StudyLocked) as refused, file_lock("held", workdir, me):
            pass
        line = str(refused.value)
        assert "\n" not in line and f"pid {holder.pid} on " in line and str(workdir / "controller.lock") in line
        with pytest.raises(StudyLocked) as refused:
            lease.acquire()
        assert f"pid {holder.pid} on " in str(refused.value) and f"lease on run {parent}" in str(refused.value)
        beat = lease.holder().heartbeat
        deadline = time.time() + 30
        while lease.holder().heartbeat == beat and time.time() < deadline:
            time.sleep(0.1)
        assert lease.holder().heartbeat > beat  # the holder's heartbeat thread keeps its lease fresh
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    with file_lock("held", workdir, me):  # the kernel freed the killed holder's lock at once
        pass
    dead = lease.holder()
    assert dead is not None and dead.pid == holder.pid  # its lease stays behind until it goes stale
    time.sleep(max(0.0, dead.heartbeat + lease.stale_s - time.time()) + 0.2)
    lease.acquire()
    assert lease.holder().owner == me.owner
    lease.release()
    assert lease.holder() is None


@pytest.mark.slow
def test_a_second_study_run_exits_2_naming_the_holder_and_the_first_finishes(tmp_path, ray_local):
    from memlayers.platform.study.controller import run_study
    from memlayers.platform.study.progress import cell_runs
    from memlayers.platform.study.validate import load_study
    from memlayers.platform.tracking.client import search_runs

    data = yaml.safe_load((REPO_ROOT / "studies" / "smoke.yaml").read_text())
    data.update(name="twice", workdir=str(tmp_path / "wd"), fit={"enabled": False})
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    second: dict = {}

    def out(line: str) -> None:
        # once the first controller holds the study and knows its cells, a second one is started
        if line.startswith("study twice: 2 cells") and not second:
            runs_before = len(search_runs(study.tracking_uri(), "twice", ""))
            second["proc"] = subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "memlayers"), "study", "run", str(path)],
                                            capture_output=True, text=True, timeout=400, cwd=tmp_path)
            second["new_runs"] = len(search_runs(study.tracking_uri(), "twice", "")) - runs_before

    result = run_study(study, out=out, poll_interval=0.5)
    refused = second["proc"]
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and f"pid {os.getpid()} on " in refused.stderr
    assert second["new_runs"] == 0  # it started nothing: no run created, none adopted or killed
    assert result.ok
    runs = cell_runs(study.tracking_uri(), "twice")
    assert len(runs) == 2 and all([r.status for r in found] == ["FINISHED"] for found in runs.values())
