"""`memlayers dashboard [STUDY] [--port P]`: the MLflow UI over a study's tracking store.

Starts `mlflow server` as a child process in its own process group, bound to 127.0.0.1 unless
`--host` says otherwise, with the study's store as backend and its `mlartifacts/` as the default
artifact root; waits for `/health`; prints the URL of the study's experiment (its runs tab); and serves until
Ctrl-C or SIGTERM, which stop the whole server process group and exit 0. Without STUDY it serves
the embedded default study (quickstart), or the store given by `--tracking-uri`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_STUDY = "quickstart"
DEFAULT_PORT = 5000
HEALTH_TIMEOUT_S = 180.0


class Stop(Exception):
    """Raised by the signal handlers to leave the serving loop."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", nargs="?", default=None,
                        help=f"study file, study name or work directory (default: {DEFAULT_STUDY})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the study's store)")
    parser.set_defaults(func=run)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((_client_host(host), port)) == 0


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def server_command(backend_uri: str, artifact_root: str | None, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    return cmd


def wait_healthy(process: subprocess.Popen, host: str, port: int, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Poll `/health` until it answers OK; RuntimeError if the server exits or times out."""
    url = f"http://{_client_host(host)}:{port}/health"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not answer {url} within {timeout:.0f} s")
        time.sleep(0.3)


def stop_server(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after `grace` seconds."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers the server left behind
    except ProcessLookupError:
        pass
    process.wait()


def _raise_stop(signum, frame):
    raise Stop(signum)


def run(args: argparse.Namespace) -> int:
    from memlayers.dashboards.study_arg import StudyNotFound, existing_store, experiment_id, resolve_study_arg
    from memlayers.platform.study_ref import artifact_root

    try:
        ref = resolve_study_arg(args.study or DEFAULT_STUDY, args.tracking_uri)
        existing_store(ref)
        exp_id = experiment_id(ref)
    except StudyNotFound as error:
        print(f"memlayers dashboard: {error}", file=sys.stderr)
        return 2
    port = args.port or free_port(_client_host(args.host))
    if port_in_use(args.host, port):
        print(f"memlayers dashboard: port {port} is in use; choose another with --port", file=sys.stderr)
        return 2
    workdir = Path(ref.workdir)
    log_path = workdir / "mlflow-ui.log" if workdir.is_dir() else Path(os.devnull)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    log = open(log_path, "ab")
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no background job workers for browsing
    process = subprocess.Popen(server_command(ref.tracking_uri, artifact_root(workdir), args.host, port),
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    try:
        print(f"starting the MLflow UI for study {ref.name} (server log: {log_path}) ...", flush=True)
        wait_healthy(process, args.host, port)
        base = f"http://{_client_host(args.host)}:{port}"
        # the experiment's runs tab: MLflow 3 otherwise opens an experiment on its GenAI overview
        url = f"{base}/#/experiments/{exp_id}/runs" if exp_id is not None else base
        if exp_id is None:
            print(f"note: no experiment named {ref.name} in {ref.tracking_uri}; showing the store's start page")
        print(f"MLflow UI: {url}", flush=True)
        print("press Ctrl-C to stop", flush=True)
        code = process.wait()
        print(f"memlayers dashboard: mlflow server exited with code {code} (see {log_path})", file=sys.stderr)
        return 1
    except Stop:
        print("stopping the MLflow UI", flush=True)
        return 0
    except RuntimeError as error:
        print(f"memlayers dashboard: {error} (see {log_path})", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN)
        stop_server(process)
        log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
