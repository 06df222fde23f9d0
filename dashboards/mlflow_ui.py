"""The MLflow UI over a study's tracking store: the server process, its health, its shutdown.

`memlayers dashboard` (platform/cli/dashboard.py) starts `mlflow server` as a child process in its own
process group, bound to 127.0.0.1 unless `--host` says otherwise (with a warning: this server has no
authentication), with the study's store as backend and its `mlartifacts/` as the default artifact root;
waits for `/health`; prints the URL of the study's experiment (its runs tab); and serves until Ctrl-C or
SIGTERM, which stop the whole server process group and exit 0. Without STUDY it serves the embedded
default study (quickstart), or the store given by `--tracking-uri`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from memlayers.platform.cluster.ports import is_loopback

HEALTH_TIMEOUT_S = 180.0


def exposure_warning(host: str) -> str | None:
    """What serving on `host` exposes, or None for loopback: the MLflow server started here has no
    authentication, so whoever reaches it can change every run."""
    if is_loopback(host):
        return None
    return (f"--host {host}: the MLflow server started here has no authentication; whoever reaches it can read "
            f"and change every run of the store (mark cells FINISHED, rewrite a study's claims). Keep 127.0.0.1 "
            f"and forward the port (ssh -L), or share an authenticated tracking server (mlflow server --app-name "
            f"basic-auth, see the README's cluster section)")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((client_host(host), port)) == 0


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def server_command(backend_uri: str, artifact_root: str | None, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    return cmd


def wait_healthy(process: subprocess.Popen, host: str, port: int, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Poll `/health` until it answers OK; RuntimeError if the server exits or times out."""
    url = f"http://{client_host(host)}:{port}/health"
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
