"""`memlayers study submit` against a real Ray head started here (127.0.0.1, token auth), from another
working directory: the job imports the shipped wheel, runs smoke.yaml to the end, and only this
test's cluster is stopped afterwards. The submitting shell holds a canary secret that must reach
nothing of the job's (its runtime env, `ray job list`, the session's logs, MLflow), and no HF offline
switch: the job runs without one."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT
from ray.job_submission import JobSubmissionClient

from memlayers.platform.cluster.ports import free_port
from memlayers.platform.study.cells import expand
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.submit import FollowStopped, follow_job
from memlayers.platform.study.validate import load_study

VENV_BIN = Path(sys.executable).parent
OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # the test session sets them; the cluster here does not


def _stop_tree(root: psutil.Process, marker: str) -> None:
    """Stop `root` (ray start --block), everything under it, and any process naming our temp dir."""
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info.get("cmdline") or []):
            procs.append(proc)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with token auth and its own ports and temp dir; stopped afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="mlh-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {**{k: v for k, v in os.environ.items() if k not in OFFLINE}, "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", str(temp),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (temp / "ray-start.log").read_text()[-2000:]
                time.sleep(1)
        yield f"http://127.0.0.1:{dashboard}", env, temp
    finally:
        _stop_tree(root, str(temp))
        log.close()
        leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(temp) in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftovers, leftovers


def _job_driver_environ(proc: subprocess.Popen, marker: str) -> dict[str, str]:
    """The environment of the job's driver process (`study run` on the head), read while it runs."""
    while proc.poll() is None:
        for candidate in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(candidate.info.get("cmdline") or [])
            if "memlayers.platform.cli.main study run" in cmdline and marker in cmdline:
                try:
                    return candidate.environ()
                except psutil.Error:
                    pass
        time.sleep(0.2)
    return {}


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # a socket or a file that went away
            pass
    return hits


def test_submit_runs_smoke_as_a_ray_job_from_another_directory(ray_head, tmp_path):
    address, env, temp = ray_head
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir = tmp_path / "wd"
    study_file = REPO_ROOT / "studies" / "smoke.yaml"
    canary = f"canary-{secrets.token_hex(8)}"
    # the submitting shell: a secret it must keep, a setting it names to ship, no HF offline switch
    shell = {**env, "AWS_SECRET_ACCESS_KEY": canary, "MLFLOW_TRACKING_PASSWORD": canary,
             "MEMLAYERS_SHIPPED_MARK": "shipped"}
    proc = subprocess.Popen([str(VENV_BIN / "memlayers"), "study", "submit", str(study_file), "--address", address,
                             "--workdir", str(workdir), "--env", "MEMLAYERS_SHIPPED_MARK", "--wait"],
                            cwd=elsewhere, env=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver_env = _job_driver_environ(proc, str(workdir))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:] + err[-2000:]
    job_id = out.splitlines()[0].strip()
    assert job_id.startswith("memlayers-smoke-")
    assert f"job {job_id}: SUCCEEDED" in out
    # the job imported the wheel it was shipped, not this checkout
    origin = next(line for line in out.splitlines() if "memlayers 0.1.0 from" in line).split(" from ")[1].strip()
    assert not origin.startswith(str(REPO_ROOT)) and origin.startswith(str(temp)), origin

    study = load_study(study_file)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    runs = cell_runs(uri, study.name)
    assert set(runs) == {c.id for c in expand(study, account_budgets=False)}
    assert all([r.status for r in found] == ["FINISHED"] for found in runs.values())
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran

    # what the job carries: the named setting, no secret, no offline switch forced on it
    runtime_env = JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}) \
        .get_job_info(job_id).runtime_env
    assert runtime_env["env_vars"]["MEMLAYERS_SHIPPED_MARK"] == "shipped"
    assert canary not in repr(runtime_env) and not set(OFFLINE) & set(runtime_env["env_vars"]), runtime_env
    assert driver_env.get("MEMLAYERS_SHIPPED_MARK") == "shipped", sorted(driver_env)  # read from the live job
    assert canary not in repr(driver_env) and not set(OFFLINE) & set(driver_env)
    listed = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and job_id in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]
    assert canary not in listed.stdout + listed.stderr
    assert _files_holding(temp, job_id.encode()), "the session's logs name the job: the search below is real"
    assert _files_holding(temp, canary.encode()) == []  # the session's logs (head, agents, job driver)
    assert _files_holding(workdir, canary.encode()) == []  # MLflow's store and artifacts, checkpoints


class _JobServer:
    """A job server as `follow_job` sees it: a job that keeps running, or requests that never return."""

    def __init__(self, hang: bool):
        self.hang, self.calls = hang, 0

    def get_job_status(self, job_id):
        self.calls += 1
        if self.hang:
            time.sleep(3600)  # a head that accepted the request and never answers
        return "JobStatus.RUNNING"

    def get_job_logs(self, job_id):
        return "step 1\n"


def test_following_a_job_is_bounded():
    started = time.monotonic()
    with pytest.raises(FollowStopped, match="still RUNNING after 0 s .--wait-timeout.; it keeps running"):
        follow_job(_JobServer(hang=False), "job-1", interval=0.05, out=lambda line: None, timeout_s=0.3)
    with pytest.raises(FollowStopped, match="has not answered for 0 s"):
        follow_job(_JobServer(hang=True), "job-2", interval=0.05, out=lambda line: None, unreachable_s=0.2,
                   request_timeout_s=0.2)
    assert time.monotonic() - started < 10
