"""Tracking outages: one retry layer tells transient failures apart and waits them out with bounded
backoff, the controller's wait for the server is bounded and says why, and a cell trains through a
real `mlflow server` stopped for a minute: it finishes, every step logged exactly once."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from test_train_in_trial import one_worker_config

from memlayers.platform.cluster.ports import free_port
from memlayers.platform.tracking.client import MetricBuffer, client_for, create_run, ensure_experiment
from memlayers.platform.tracking.retry import TrackingUnavailable, transient, wait_for_tracking, with_retry
from memlayers.platform.train.in_trial import run_in_trial

OUTAGE_S = 60


def test_transient_failures_are_retried_with_backoff_and_others_raised_at_once():
    refused = MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed with exception "
                              "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded (Connection refused)")
    assert transient(refused) and transient(MlflowException("failed with error code 503 != 200"))
    assert transient(MlflowException("(sqlite3.OperationalError) database is locked"))
    assert not transient(MlflowException("Run 'abc' not found")) and not transient(ValueError("bad value"))
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise refused
        return "done"

    assert with_retry(flaky, delay=0.05) == "done" and len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # the delay doubles (sleeps are lower bounds)
    calls.clear()
    with pytest.raises(MlflowException, match="not found"):
        with_retry(lambda: calls.append(0) or (_ for _ in ()).throw(MlflowException("Run 'abc' not found")))
    assert len(calls) == 1
    started = time.monotonic()
    with pytest.raises(MlflowException, match="Connection refused"):
        with_retry(lambda: (_ for _ in ()).throw(refused), deadline_s=1.0, delay=0.1)
    assert time.monotonic() - started < 3


def test_waiting_for_the_tracking_server_is_bounded_and_names_it():
    uri, said = f"http://127.0.0.1:{free_port()}", []
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=f"tracking server {uri} unreachable for 2 s"):
        wait_for_tracking(uri, timeout_s=2, out=said.append)
    assert time.monotonic() - started < 10 and said == [f"waiting up to 2 s for the tracking server {uri} "
                                                         "(ConnectionError)"]
    wait_for_tracking("sqlite:///nowhere/mlflow.db", timeout_s=0)  # a local store has no server to wait for


def test_metrics_wait_on_disk_while_the_store_is_unreachable_and_are_sent_once(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = create_run(store, ensure_experiment(store, "spool", tmp_path / "mlartifacts"), "r", {})
    away = MetricBuffer(f"http://127.0.0.1:{free_port()}", run_id, tmp_path)  # the run's server, down
    away.add(5, {"loss": 2.0})
    away.set_tags({"memlayers.progress": "5 2 100"})
    assert away.flush() is False
    away.add(10, {"loss": 1.5})
    started = time.monotonic()
    assert away.flush() is False and time.monotonic() - started < 0.5  # within the backoff: no call made
    assert [r[3] for r in away.spool.metrics()] == [5, 10] and away.spool.tags() == {"memlayers.progress": "5 2 100"}
    back = MetricBuffer(store, run_id, tmp_path)  # the store answers again (a restarted worker: same spool)
    back.skip_logged()
    back.add(10, {"loss": 9.9})  # a replayed step already owed to the store is dropped
    back.drain()
    client = client_for(store)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(5, 2.0), (10, 1.5)]
    assert client.get_run(run_id).data.tags["memlayers.progress"] == "5 2 100"
    assert back.spool.metrics() == [] and back.spool.tags() == {}


def _server(tmp_path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "server-artifacts")]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a crash or a lost node stops them
        server.wait(timeout=60)


@pytest.mark.slow
def test_a_cell_trains_through_a_minute_without_its_tracking_server(tmp_path):
    port = free_port()
    uri, server = f"http://127.0.0.1:{port}", _server(tmp_path, port)
    try:
        # long enough (tens of seconds even on an idle machine) to be training when the server goes away
        cfg = one_worker_config(tmp_path / "cell", steps=1200, checkpoint_every=300, eval_every=1200, log_every=20)
        cfg.tracking.uri = uri
        results = []  # the cell starts while the server still boots: its first calls wait for it
        cell = threading.Thread(target=lambda: results.append(run_in_trial(cfg, workdir=tmp_path / "cell", job="j")))
        cell.start()
        wait_for_tracking(uri, timeout_s=300)
        spool, client = tmp_path / "cell" / "tracking-spool", client_for(uri)
        while not (cfg.tracking.run_id and with_retry(lambda: client.get_metric_history(cfg.tracking.run_id, "loss"))):
            assert cell.is_alive(), results
            time.sleep(0.2)
        _stop(server)
        down = time.monotonic()
        while not any(spool.glob("*.metrics.jsonl")) and time.monotonic() - down < OUTAGE_S:
            time.sleep(0.2)
        assert any(spool.glob("*.metrics.jsonl")), "training did not go on (nothing spooled) while the server was down"
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        server = _server(tmp_path, port)  # the same port and store
        cell.join(timeout=600)
        assert not cell.is_alive() and results and results[0].status == "FINISHED", results
        run = client.get_run(results[0].run_id)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(20, 1201, 20)) and run.info.status == "FINISHED"
        assert not list(spool.glob("*.jsonl")) and not list(spool.glob("*.tags.json"))  # all of it acknowledged
        assert not client.search_runs([run.info.experiment_id], "attributes.status = 'FAILED'")
    finally:
        _stop(server)
