"""The MLflow UI over a study's tracking store: the server process, its health, its shutdown.

`memlayers dashboard` (platform/cli/dashboard.py) starts `mlflow server` as a child process in its own
process group, bound to 127.0.0.1 unless `--host` says otherwise (with a warning: this server has no
authentication), with the study's store as backend and its `mlartifacts/` as the default artifact root;
waits for `/health`; prints the URL of the study's cells; and serves until Ctrl-C or SIGTERM, which stop
the whole server process group and exit 0. Without STUDY it serves the embedded default study
(quickstart), or the store given by `--tracking-uri`.

The URL opens where a reader wants to look: MLflow's UI keeps a runs table's state (filter, order,
columns) in a saved view, an experiment tag `mlflow.sharedViewState.<key>` holding JSON that the URL
names with `viewStateShareKey=<key>`. `publish_cells_view` writes the view of the study's cells (a flat
list, not folded under the parent run, ordered by name, with the columns `CELL_COLUMNS`) and marks the
experiment as model training, so the UI opens its runs table rather than its GenAI overview.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from memlayers.platform.cluster.ports import is_loopback
from memlayers.platform.tracking.client import client_for, with_retry
from memlayers.platform.tracking.conventions import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    ROLE_TAG,
    RUN_NAME_TAG,
    SHARED_VIEW_PREFIX,
)

HEALTH_TIMEOUT_S = 180.0
CELLS_VIEW = "memlayers-cells"
CELL_COLUMNS = ("tags.`family`", "tags.`base`", "tags.`memory_slots`", "tags.`seed`", "metrics.`val_loss`",
                "metrics.`qa_exact_match`")


def cells_view() -> dict:
    """The runs table of a study's cells: filtered to them (a filter also stops the UI nesting them
    under the parent run), ordered by run name, with what tells cells apart and how they did."""
    return {"searchFilter": f"tags.`{ROLE_TAG}` = 'cell'", "orderByKey": f"tags.`{RUN_NAME_TAG}`",
            "orderByAsc": True, "selectedColumns": list(CELL_COLUMNS)}


def publish_cells_view(tracking_uri: str, experiment_id: str) -> None:
    """Save the cells' view on the study's experiment and mark it as model training (both tags are
    rewritten each time, so a store from before this view gets it too)."""
    client = client_for(tracking_uri)
    for key, value in ((SHARED_VIEW_PREFIX + CELLS_VIEW, json.dumps(cells_view())),
                       (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)):
        with_retry(lambda key=key, value=value: client.set_experiment_tag(experiment_id, key, value))


def cells_url(base: str, experiment_id: str) -> str:
    """The study's runs tab opened on the cells' saved view (see `publish_cells_view`)."""
    # workflowType: the UI's own switch between its GenAI and "Model training" navigation
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={CELLS_VIEW}"
            "&workflowType=machine_learning")


def open_in_browser(url: str) -> bool:
    """Open `url` in the user's browser when one can show it (a terminal session with a display);
    never from a pipe or a headless machine, where a browser would start invisibly and linger."""
    import webbrowser  # deferred: only an interactive session opens a browser

    has_display = sys.platform == "darwin" or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if not (sys.stdout.isatty() and has_display):
        return False
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


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
