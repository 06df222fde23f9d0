"""`memlayers dashboard`: the MLflow UI over a study's store, found by REST, seen in Chromium, stopped cleanly."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from browser import Chromium, find_chromium
from dashboards_helpers import CELLS, build_study, run_name

from memlayers.platform.cluster.ports import free_port

START_TIMEOUT_S = 240  # mlflow server answers /health after ~10 s on an idle machine


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


def _wait_for_url(lines: queue.Queue, output: list[str]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        output.append(line)
        if line.startswith("MLflow UI: "):
            return line.split(": ", 1)[1].strip()
    raise AssertionError("the dashboard printed no URL:\n" + "".join(output))


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.browser
@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_dashboard_serves_the_study_and_stops_cleanly(tmp_path):
    study = build_study(tmp_path / "smoke")
    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "memlayers.platform.cli.main", "dashboard", str(study.workdir),
                                  "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(dashboard.stdout, lines), daemon=True).start()
    output: list[str] = []
    server_processes: list[psutil.Process] = []
    try:
        url = _wait_for_url(lines, output)
        server_processes = psutil.Process(dashboard.pid).children(recursive=True)
        server_cmd = " ".join(server_processes[0].cmdline())
        assert "mlflow" in server_cmd and "--host 127.0.0.1" in server_cmd, server_cmd

        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=smoke",
                                    timeout=30) as response:
            experiment_id = json.loads(response.read())["experiment"]["experiment_id"]
        assert url == (f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey=memlayers-cells"
                       "&workflowType=machine_learning")
        found = _post(f"{base}/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [experiment_id], "filter": "tags.`memlayers.role` = 'cell'",
                       "max_results": 100})["runs"]
        names = {run["info"]["run_name"] for run in found}
        assert names == {run_name(f, b, s, e) for f, b, s, e, _, _ in CELLS}

        with Chromium(width=1920, height=1000) as browser:
            browser.open(url)
            # the URL opens the cells' saved view: every cell listed flat (nothing to unfold), the parent
            # run filtered out, and the columns that tell cells apart and say how they did
            listed = " && ".join(f"document.body.innerText.includes('{name}')" for name in sorted(names))
            shown = browser.wait_for(f"document.body.innerText.includes('{len(CELLS)} matching runs') "
                                     f"&& {listed} && document.body.innerText", timeout=180)
            header_text = ("Array.from(document.querySelectorAll('[role=columnheader]'))"
                           ".map(e => e.innerText.trim()).join('\\n')")
            headers = set(browser.wait_for(f"{header_text}.includes('val_loss') && {header_text}", timeout=60)
                          .split("\n"))
            shot = browser.screenshot(tmp_path / "mlflow-ui.png", full_page=False)
        assert "study-smoke" not in shown
        assert {"family", "base", "memory_slots", "seed", "val_loss", "qa_exact_match"} <= headers, headers
        # the UI in its "Model training" navigation: the model registry, none of the GenAI pages
        assert "Model registry" in shown and not {"Judges", "Prompts", "Sessions"} & set(shown.split("\n")), shown
        assert shot.stat().st_size > 10_000
    finally:
        dashboard.send_signal(signal.SIGINT)
        try:
            code = dashboard.wait(60)
        finally:
            if dashboard.poll() is None:
                dashboard.kill()
    assert code == 0, "".join(output)
    assert not _port_open(port)
    alive = [p.pid for p in server_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], alive


def test_dashboard_unknown_study_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "dashboard", "no-such-study",
                             "--port", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no tracking store" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_study_experiment_is_created_as_model_training(tmp_path, monkeypatch):
    """The controller's parent run marks the study's experiment, so MLflow's UI opens its runs table."""
    from dashboards_helpers import STUDY_YAML

    from memlayers.platform.study.bookkeeping import parent_run
    from memlayers.platform.study.validate import load_study
    from memlayers.platform.tracking.client import client_for
    from memlayers.platform.tracking.conventions import EXPERIMENT_KIND_TAG, sqlite_uri

    monkeypatch.setenv("MEMLAYERS_RUNS_ROOT", str(tmp_path / "runs"))
    (tmp_path / "kind.yaml").write_text(STUDY_YAML.format(name="kind").replace("moe]", "moe]\n  experts: [4]"))
    uri = sqlite_uri(tmp_path)
    parent_run(load_study(tmp_path / "kind.yaml"), uri)
    experiment = client_for(uri).get_experiment_by_name("kind")
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == "custom_model_development"
