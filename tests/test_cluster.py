"""Studies on a real two-node Ray cluster with no shared scratch disk (tests/two_nodes.py): a head with
no CPUs, a worker node in its own mount namespace, a real S3-compatible server (moto) and a real
MLflow tracking server, all on 127.0.0.1. Built once for the module; only its own processes are
stopped, by process group."""

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from two_nodes import VENV_BIN, can_build, kill_worker, start_worker, two_nodes

from memlayers.platform.cli.main import main
from memlayers.platform.cluster.storage import list_files, read_text
from memlayers.platform.study.cells import expand
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.validate import load_study
from memlayers.platform.tracking.client import client_for

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_two_nodes():
    reason = can_build()
    if reason:
        pytest.skip(f"two-node cluster: {reason}")
    started = time.monotonic()
    with two_nodes() as cluster:
        print(f"\ntwo-node cluster, moto and MLflow server up in {time.monotonic() - started:.1f} s")
        yield cluster


@pytest.fixture
def cluster_env(ray_two_nodes, monkeypatch):
    """This process as a laptop outside the cluster: the S3 endpoint and credentials, nothing else."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.setenv(key, ray_two_nodes.env[key])
    return ray_two_nodes


def _memlayers(cluster, args: list[str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(VENV_BIN / "memlayers"), *args], cwd=cwd, env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def _study_file(tmp_path: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data["name"] = name
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _steps(uri: str, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client_for(uri).get_metric_history(run_id, key))


def test_submit_with_s3_storage_and_a_tracking_server_then_inspect_from_outside(cluster_env, tmp_path, monkeypatch):
    cluster = cluster_env
    started = time.monotonic()
    proc = _memlayers(cluster, ["study", "submit", str(SMOKE), "--address", cluster.dashboard, "--storage",
                                cluster.storage, "--tracking-uri", cluster.tracking,
                                "--workdir", str(cluster.root / "scratch-smoke"), "--wait"], tmp_path / "elsewhere")
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert list((tmp_path / "elsewhere").iterdir()) == []  # nothing written where the command ran

    study = load_study(SMOKE)
    runs = cell_runs(cluster.tracking, "smoke")
    assert set(runs) == {c.id for c in expand(study, account_budgets=False)}
    for cell_id, found in runs.items():
        assert [r.status for r in found] == ["FINISHED"], (cell_id, found)
        steps = _steps(cluster.tracking, found[0].run_id)
        assert steps == sorted(set(steps)) == [2, 4, 6]  # every step logged once
    durations = [(r.info.end_time - r.info.start_time) / 1000 for r in
                 (client_for(cluster.tracking).get_run(found[0].run_id) for found in runs.values())]
    print(f"\nsubmit --wait on two nodes: {wall:.1f} s; cell runs {', '.join(f'{d:.1f} s' for d in durations)}")

    files = list_files(f"{cluster.storage}/smoke")
    assert "laws/laws.json" in files and "study.yaml" in files and "cells.json" in files
    for cell in expand(study, account_budgets=False):
        # one worker: the cell trained in its trial, checkpoints in checkpoints/<run>-<id>/ (train/in_trial.py)
        assert any(f.startswith(f"checkpoints/{cell.name}-") and "/checkpoint_" in f for f in files), (cell.name, files)
    assert any(f.startswith("tune/") for f in files)

    # from outside the cluster: no shared disk, only the tracking URI and the storage root
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    monkeypatch.chdir(laptop)
    settings = ["--tracking-uri", cluster.tracking, "--storage", cluster.storage]
    assert main(["study", "status", "smoke", *settings]) == 0
    assert main(["fit", "--study", "smoke", *settings]) == 0
    assert main(["report", "smoke", *settings]) == 0
    assert main(["dashboard", "smoke", "--tracking-uri", cluster.tracking]) == 0
    assert read_text(f"{cluster.storage}/smoke/report/report.html").startswith("<!")
    assert '"compute_laws"' in read_text(f"{cluster.storage}/smoke/laws/laws.json")


def test_sqlite_store_on_two_nodes_is_refused_before_any_cell(cluster_env, tmp_path):
    cluster = cluster_env
    db = tmp_path / "store" / "mlflow.db"  # the worker node has its own /tmp: it cannot see this file
    proc = _memlayers(cluster, ["study", "submit", str(SMOKE), "--address", cluster.dashboard,
                                "--storage", f"{cluster.storage}/refused", "--tracking-uri", f"sqlite:///{db}",
                                "--workdir", str(tmp_path / "wd"), "--wait"], tmp_path / "elsewhere")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "FAILED" in last and "tracking.uri" in last and "http://" in last, last
    assert not db.exists()  # no store, so no run and no cell started
    assert list_files(f"{cluster.storage}/refused") == []


def test_a_failing_cell_does_not_leave_the_others_pending(ray_two_nodes, tmp_path):
    cluster = ray_two_nodes
    grid = {"bases": ["nano"], "families": ["dense", "memory_plus"], "memory_sizes": [1024],
            # both die at step 2; dense has no restart left and fails, memory_plus is restarted and resumes
            "overrides": {"dense": {"resources": {"max_failures": 0}},
                          "memory_plus": {"resources": {"max_failures": 1}}}}
    train = {**yaml.safe_load(SMOKE.read_text())["train"], "fail_at_step": 2}
    path = _study_file(tmp_path, "failing", grid=grid, train=train)
    proc = _memlayers(cluster, ["study", "run", str(path), "--address", cluster.gcs, "--storage", cluster.storage,
                                "--tracking-uri", cluster.tracking, "--workdir", str(tmp_path / "wd"), "--no-report"],
                      tmp_path / "elsewhere")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "cells 1/2 done, 0 running, 1 failed, 0 pending" in proc.stdout
    runs = cell_runs(cluster.tracking, "failing")
    by_family = {found[0].tags["family"]: found for found in runs.values()}
    assert [r.status for r in by_family["dense"]] == ["FAILED"]
    assert by_family["dense"][0].tags.get("failure_reason")
    assert [r.status for r in by_family["memory_plus"]] == ["FINISHED"]
    assert _steps(cluster.tracking, by_family["memory_plus"][0].run_id) == [2, 4, 6]


def test_worker_node_killed_mid_cell_resumes_from_its_checkpoint_in_the_bucket(cluster_env, tmp_path):
    cluster = cluster_env
    # ~4k tokens a step (~0.1-0.2 s here): the kill lands between checkpoints, not after the last one
    train = {**yaml.safe_load(SMOKE.read_text())["train"], "batch_size": 128, "checkpoint_every": 40,
             "log_every": 10, "eval_every": 160}
    path = _study_file(tmp_path, "fault", grid={"bases": ["nano"], "families": ["dense"]}, budget={"steps": 160},
                       train=train)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([str(VENV_BIN / "memlayers"), "study", "run", str(path), "--address", cluster.gcs,
                               "--storage", cluster.storage, "--tracking-uri", cluster.tracking,
                               "--workdir", str(tmp_path / "wd"), "--no-report", "--no-fit"],
                              cwd=tmp_path, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        seen: list[int] = []
        while time.monotonic() < deadline and driver.poll() is None:
            runs = cell_runs(cluster.tracking, "fault")
            if runs:
                run = next(iter(runs.values()))[0]
                seen = _steps(cluster.tracking, run.run_id)
                if seen and seen[-1] >= 40:  # the first checkpoint is in the bucket and its steps are logged
                    break
            time.sleep(0.2)
        assert driver.poll() is None and 40 <= seen[-1] < 160, ((tmp_path / "driver.log").read_text()[-3000:], seen)
        kill_worker(cluster, cluster.procs["worker1"])
        start_worker(cluster)  # Ray Train restarts the worker group on the new node
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, out[-4000:]
    runs = cell_runs(cluster.tracking, "fault")
    assert len(runs) == 1
    (found,) = runs.values()
    assert [r.status for r in found] == ["FINISHED"]  # one run for the cell
    assert _steps(cluster.tracking, found[0].run_id) == list(range(10, 161, 10))  # each step logged once
    checkpoints = [f for f in list_files(f"{cluster.storage}/fault") if "/checkpoint_" in f and f.endswith("meta.json")]
    assert len(checkpoints) >= 2
