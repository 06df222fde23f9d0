"""The study controller on a real local Ray with a real SQLite MLflow: failures recorded and retried,
Optuna lr tuning reused, status from MLflow, and resume after the controller is SIGKILLed."""

import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from conftest import REPO_ROOT

from memlayers.platform.cli.main import main
from memlayers.platform.study.cells import expand
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.validate import load_study
from memlayers.platform.tracking.client import search_runs

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"


def _one_run_per_cell(uri: str, study) -> dict:
    """{cell id: its run}, asserting every cell has exactly one run and it FINISHED."""
    runs = cell_runs(uri, study.name)
    cells = expand(study, account_budgets=False)
    assert set(runs) == {c.id for c in cells}
    for cell in cells:
        assert [r.status for r in runs[cell.id]] == ["FINISHED"], (cell.name, runs[cell.id])
    return {cell_id: found[0] for cell_id, found in runs.items()}


def _parents(uri: str, name: str) -> list:
    return search_runs(uri, name, "tags.`memlayers.role` = 'study'")


def test_status_of_a_study_that_never_ran_is_all_pending_and_creates_nothing(tmp_path, capsys):
    data = yaml.safe_load(SMOKE.read_text())
    data["workdir"] = str(tmp_path / "wd")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "status", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == "cells 0/2 done, 0 running, 0 failed, 2 pending"
    assert not (tmp_path / "wd").exists()


def test_failed_cell_is_recorded_tuned_lr_reused_and_retry_continues_the_same_run(tmp_path, ray_local, capsys):
    data = yaml.safe_load(SMOKE.read_text())
    data.update(name="ctl", workdir=str(tmp_path / "wd"), fit={"enabled": False})
    data["grid"] = {"bases": ["nano"], "families": ["dense", "memory_plus"], "memory_sizes": [1024],
                    # dense dies at step 4 with no retry left; memory_plus dies too but gets one restart
                    "overrides": {"dense": {"resources": {"max_failures": 0}},
                                  "memory_plus": {"resources": {"max_failures": 1}}}}
    data["train"].update(fail_at_step=4)
    data["lr"] = {"tune": True, "trials": 1, "steps": 2, "range": [1e-3, 1e-2]}
    path = tmp_path / "ctl.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)

    from memlayers.platform.study.controller import run_study
    first = run_study(study, poll_interval=0.5)
    uri = first.tracking_uri
    dense, memory = first.cells
    assert first.states == {dense.id: "failed", memory.id: "done"}
    runs = cell_runs(uri, "ctl")
    assert [r.status for r in runs[dense.id]] == ["FAILED"]
    assert "failure_reason" in runs[dense.id][0].tags
    assert [r.status for r in runs[memory.id]] == ["FINISHED"]  # survived its crash: restarted, resumed

    tuning = cell_runs(uri, "ctl", role="tuning")
    assert sorted(tuning) == ["nano/dense", "nano/memory_plus"]
    assert all(len(found) == 1 and all(r.status == "FINISHED" for r in found) for found in tuning.values())
    import optuna
    storage = f"sqlite:///{tmp_path / 'wd' / 'optuna.db'}"
    best = optuna.load_study(study_name="ctl:nano:memory_plus", storage=storage).best_params["lr"]
    assert runs[memory.id][0].tags["lr_source"] == "tuned"
    from memlayers.platform.tracking.client import client_for
    params = client_for(uri).get_run(runs[memory.id][0].run_id).data.params
    assert float(params["train.lr"]) == pytest.approx(best)

    assert main(["study", "status", str(path)]) == 0
    status = capsys.readouterr().out
    assert status.strip().splitlines()[-1] == "cells 1/2 done, 0 running, 1 failed, 0 pending"
    assert "reason:" in status

    second = run_study(load_study(path), poll_interval=0.5)
    assert second.ok
    again = _one_run_per_cell(uri, study)
    assert again[dense.id].run_id == runs[dense.id][0].run_id    # the failed cell's run was continued
    assert again[memory.id].run_id == runs[memory.id][0].run_id
    assert sum(len(v) for v in cell_runs(uri, "ctl", role="tuning").values()) == 2  # tuning not repeated
    assert len(_parents(uri, "ctl")) == 1


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.ray
@pytest.mark.slow
def test_killed_controller_resumes_without_duplicates(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["workdir"] = str(tmp_path / "wd")
    # cells of a few seconds each (they start in well under one): the kill lands inside the second
    data["budget"] = {"steps": 600}
    data["train"].update(eval_every=600, checkpoint_every=100, log_every=50)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    uri = study.tracking_uri()
    command = [sys.executable, "-m", "memlayers.platform.cli.main", "study", "run", str(path)]
    log = open(tmp_path / "first.log", "w")
    # one CPU: cells run one after another, so the kill lands between/inside cells
    proc = subprocess.Popen(command + ["--num-cpus", "1"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        finished_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            tree = _descendants(proc.pid) or tree
            ready = "already finished" in (tmp_path / "first.log").read_text()  # the store is initialised
            states = [r.status for found in cell_runs(uri, "smoke").values() for r in found] if ready else []
            if "FINISHED" in states:
                finished_at = finished_at or time.monotonic()
                if "RUNNING" in states or time.monotonic() - finished_at > 15:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        tree = _descendants(proc.pid) or tree
        assert tree, "the controller should have started Ray processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    before = {cid: found for cid, found in cell_runs(uri, "smoke").items()}
    assert any(r.status == "FINISHED" for found in before.values() for r in found)
    assert sum(all(r.status == "FINISHED" for r in found) for found in before.values()) < 2  # work was left

    deadline = time.monotonic() + 30  # the local Ray cluster dies with its driver
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.5)
    lingering = _alive(tree)
    names = []
    for leftover in lingering:
        try:
            names.append(leftover.name())
            leftover.kill()
        except psutil.Error:
            pass
    assert not lingering, names

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already finished" in second.stdout
    runs = _one_run_per_cell(uri, study)
    for cell_id, found in before.items():  # a cell that had a run (finished or not) kept that run
        assert [r.run_id for r in found] == [runs[cell_id].run_id]
    assert len(_parents(uri, "smoke")) == 1
    assert (tmp_path / "wd" / "laws" / "laws.json").is_file()
    assert "fitted laws:" in second.stdout and "MLflow store:" in second.stdout
