"""`memlayers dashboard [STUDY] [--port P]`: serve the MLflow UI over a study's tracking store.

Bound to 127.0.0.1 unless `--host` says otherwise (another interface gets a warning first: the server
has no authentication); prints the URL of the study's cells (the runs table filtered to them, with their
family, base, memory size, seed, validation loss and QA exact match as columns; `mlflow_ui.publish_cells_view`),
opens it where a browser can show it, and serves until Ctrl-C or SIGTERM, which stop the whole server
process group and exit 0.
Without STUDY it serves the embedded default study (quickstart), or the store given by `--tracking-uri`.
A tracking server (`--tracking-uri http://HOST:5000`) already serves the UI: the command prints the
study's URL there and exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from memlayers.dashboards.mlflow_ui import (
    cells_url,
    client_host,
    exposure_warning,
    open_in_browser,
    port_in_use,
    publish_cells_view,
    server_command,
    stop_server,
    wait_healthy,
)
from memlayers.dashboards.study_arg import StudyNotFound, existing_store, experiment_id, resolve_study_arg
from memlayers.platform.cluster.ports import free_port
from memlayers.platform.tracking.conventions import artifact_root, is_remote

DEFAULT_STUDY = "quickstart"
DEFAULT_PORT = 5000


class Stop(Exception):
    """Raised by the signal handlers to leave the serving loop."""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", nargs="?", default=None,
                        help=f"study file, study name or work directory (default: {DEFAULT_STUDY})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the study's store)")
    parser.add_argument("--no-browser", action="store_true", help="print the URL without opening a browser")
    parser.set_defaults(func=run)


def _raise_stop(signum, frame):
    raise Stop(signum)


def _cells_url(tracking_uri: str, base: str, exp_id: str) -> str:
    """The study's cells view, saved on its experiment first; the plain runs tab where the store
    refuses the write (a read-only user of a tracking server)."""
    try:
        publish_cells_view(tracking_uri, exp_id)
    except Exception as error:  # MlflowException (permission) or an unreachable server after retries
        print(f"note: could not save the cells' view on the experiment ({type(error).__name__}); "
              "showing its runs tab", file=sys.stderr)
        return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs"
    return cells_url(base, exp_id)


def run(args: argparse.Namespace) -> int:
    warning = exposure_warning(args.host)
    if warning:
        print(f"memlayers dashboard: warning: {warning}", file=sys.stderr, flush=True)
    try:
        ref = resolve_study_arg(args.study or DEFAULT_STUDY, args.tracking_uri)
        existing_store(ref)
        exp_id = experiment_id(ref)
    except StudyNotFound as error:
        print(f"memlayers dashboard: {error}", file=sys.stderr)
        return 2
    if is_remote(ref.tracking_uri):
        if exp_id is None:
            print(f"memlayers dashboard: no experiment named {ref.name} at {ref.tracking_uri}", file=sys.stderr)
            return 2
        print(f"MLflow UI: {_cells_url(ref.tracking_uri, ref.tracking_uri, exp_id)}", flush=True)
        return 0
    port = args.port or free_port(client_host(args.host))
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
        base = f"http://{client_host(args.host)}:{port}"
        url = _cells_url(ref.tracking_uri, base, exp_id) if exp_id is not None else base
        if exp_id is None:
            print(f"note: no experiment named {ref.name} in {ref.tracking_uri}; showing the store's start page")
        print(f"MLflow UI: {url}", flush=True)
        if not args.no_browser:
            open_in_browser(url)
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
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        stop_server(process)
        log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
