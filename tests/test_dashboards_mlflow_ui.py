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
        assert url == f"{base}/#/experiments/{experiment_id}/runs"
        found = _post(f"{base}/api/2.0/mlflow/runs/search",
                      {"experiment_ids": [experiment_id], "filter": "tags.`memlayers.role` = 'cell'",
                       "max_results": 100})["runs"]
        names = {run["info"]["run_name"] for run in found}
        assert names == {run_name(f, b, s, e) for f, b, s, e, _, _ in CELLS}

        with Chromium(width=1400, height=900) as browser:
            browser.open(url)
            browser.wait_for("document.querySelector('#root') && document.querySelector('#root').children.length > 0",
                             timeout=120)
            # the runs table lists the study's parent run; expanding it shows the cells nested under it
            shown = browser.wait_for("document.body.innerText.includes('study-smoke') && document.body.innerText",
                                     timeout=120)
            assert f"{len(CELLS) + 1} matching runs" in shown
            browser.evaluate("document.querySelector('button[data-component-id*=runnamecellrenderer]').click()")
            shown = browser.wait_for("document.body.innerText.includes('dense-nano-seed0') && document.body.innerText",
                                     timeout=60)
            shot = browser.screenshot(tmp_path / "mlflow-ui.png", full_page=False)
        assert all(name in shown for name in names), shown
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
    result = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "dashboard", "no-such-study", "--port", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no tracking store" in result.stderr
    assert list(tmp_path.iterdir()) == []
