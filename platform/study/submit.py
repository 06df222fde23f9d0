"""Submit a study to a Ray cluster as a Ray Job that ships this version of memlayers.

`submit_study(file, "http://HEAD:8265")` builds a wheel of the project (`pip wheel --no-deps` of a
staged copy of the sources, so the checkout is left untouched), unpacks it, and submits a job whose
runtime env carries the unpacked wheel as a `py_modules` entry (uploaded to the cluster by the job
client; nothing is fetched from a package index, so it works offline) and the study file as its
`working_dir`. The entrypoint is `python -m memlayers.platform.cli.main study run <file> --address auto`;
the cluster must already have memlayers' dependencies (torch, ray, mlflow, ...).

What the job is given: the study's `--storage` and `--tracking-uri` (as command-line overrides), the
variables the user names with `--env NAME` (and `--ship-secret NAME` for one that looks like a secret:
see platform/cluster/secrets.py), and, unless `--workdir` names one, a work directory under
`~/memlayers/runs` on the head node (`MEMLAYERS_RUNS_ROOT`) rather than Ray's per-session folder the
job runs in. Nothing else of the driver's environment: a job's `runtime_env` is shown by the Ray
dashboard and `ray job list` and logged on every node, so credentials reach the workers the cluster's
own way (the nodes' environment, instance or pod identity, a credentials file named by path), and
offline switches such as `HF_HUB_OFFLINE` are the cluster's to set, not forced on every job.

Token authentication (Ray 2.60 enables it for local clusters): the client needs `RAY_AUTH_MODE=token`
and the cluster's token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`); when a
token is available and `RAY_AUTH_MODE` is unset, token mode is switched on for the client.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Callable, TypeVar

import tomllib

T = TypeVar("T")

JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SUBMIT_TIMEOUT_S = 300.0  # connecting, uploading the wheel and the study, and the job's creation
REQUEST_TIMEOUT_S = 60.0  # one status or logs request while following a job
UNREACHABLE_S = 300.0  # how long following a job rides out a job server that does not answer
CLUSTER_RUNS_ROOT = "~/memlayers/runs"  # the job's default runs root, on the head node (never Ray's session folder)


def source_root() -> Path:
    """The checkout this module runs from (holds pyproject.toml); the wheel is built from it."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"cannot build a wheel: {root} is not a memlayers source checkout (no pyproject.toml)")
    return root


def _stage(root: Path, staging: Path) -> Path:
    """Copy what the wheel is made of: pyproject, top-level files and the listed packages' folders."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    folders = {name.split(".")[1] for name in packages if name.count(".") >= 1} | {"studies"}
    staging.mkdir(parents=True)
    for path in root.iterdir():
        if path.is_file() and (path.suffix in (".py", ".toml", ".md", ".txt") or path.name.startswith("LICENSE")):
            shutil.copy2(path, staging / path.name)
    package_dirs = {root.joinpath(*name.split(".")[1:]) for name in packages}
    caches = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:
        # a `runs` folder is a study's outputs (./runs/NAME), unless a listed package lives there
        runs = {"runs"} if Path(folder) / "runs" not in package_dirs else set()
        return set(caches(folder, names)) | (runs & set(names))

    for folder in sorted(folders):
        if (root / folder).is_dir():
            shutil.copytree(root / folder, staging / folder, ignore=ignore)
    return staging


def build_wheel(out_dir: Path) -> Path:
    """A wheel of memlayers in `out_dir` (built offline, without build isolation)."""
    staging = _stage(source_root(), Path(out_dir) / "src")
    dist = Path(out_dir) / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(dist), str(staging)], check=True, cwd=out_dir, stdout=subprocess.DEVNULL)
    wheels = sorted(dist.glob("memlayers-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel wrote no memlayers wheel into {dist}")
    return wheels[-1]


def unpack_wheel(wheel: Path, out_dir: Path) -> Path:
    """Extract the wheel; returns its `memlayers/` package folder (a py_modules entry)."""
    site = Path(out_dir) / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site / "memlayers"


def enable_token_auth_if_available() -> None:
    """Token mode for the job client when a token is at hand and no mode was chosen."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def job_command(file_name: str, *, workdir: str | None = None, storage: str | None = None,
                tracking_uri: str | None = None, python: str = "python",
                extra_args: list[str] | None = None) -> list[str]:
    """The job's entrypoint: `study run` joining the cluster, with the study's overrides."""
    command = [python, "-m", "memlayers.platform.cli.main", "study", "run", file_name, "--address", "auto"]
    for flag, value in (("--workdir", workdir), ("--storage", storage), ("--tracking-uri", tracking_uri)):
        if value:
            command += [flag, value]
    return command + list(extra_args or [])


def job_env(environ: dict[str, str] | None = None, *, workdir: str | None = None,
            shipped: dict[str, str] | None = None) -> dict[str, str]:
    """The job's environment variables: JOB_ENV, the variables the user chose to ship (`shipped_env`), and
    the runs root on the cluster when no workdir is given. Nothing else of `environ` travels."""
    environ = dict(os.environ if environ is None else environ)
    env = {**JOB_ENV, **(shipped or {})}
    if not workdir:
        env["MEMLAYERS_RUNS_ROOT"] = environ.get("MEMLAYERS_RUNS_ROOT", CLUSTER_RUNS_ROOT)
    return env


def submit_study(file: Path, address: str, *, workdir: str | None = None, storage: str | None = None,
                 tracking_uri: str | None = None, python: str = "python", extra_args: list[str] | None = None,
                 shipped: dict[str, str] | None = None):
    """Submit `file` as a Ray Job at `address` carrying the `shipped` variables; returns (job id,
    JobSubmissionClient)."""
    enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient  # deferred: ray is heavy and only this path needs it

    file = Path(file).resolve()
    with tempfile.TemporaryDirectory(prefix="memlayers-submit-") as tmp:
        tmp = Path(tmp)
        wheel = build_wheel(tmp)
        module_dir = unpack_wheel(wheel, tmp)
        job_dir = tmp / "job"
        job_dir.mkdir()
        shutil.copyfile(file, job_dir / file.name)
        command = job_command(file.name, workdir=workdir, storage=storage, tracking_uri=tracking_uri,
                              python=python, extra_args=extra_args)
        runtime_env = {"working_dir": str(job_dir), "py_modules": [str(module_dir)],
                       "env_vars": job_env(workdir=workdir, shipped=shipped)}

        def submit():
            client = JobSubmissionClient(address)
            return client.submit_job(
                entrypoint=" ".join(shlex.quote(part) for part in command), runtime_env=runtime_env,
                submission_id=f"memlayers-{file.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                metadata={"study_file": file.name, "wheel": wheel.name}), client

        # the job client's requests carry no timeout of their own: a head that accepts and never answers
        job_id, client = bounded(submit, SUBMIT_TIMEOUT_S, f"submitting to {address}")
    return job_id, client


class FollowStopped(RuntimeError):
    """Following a job stopped before it ended (the job itself goes on); the message says why, in one line."""


def bounded(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """`call()`, or TimeoutError naming `what` when it has not returned within `timeout_s` (it is left to
    finish in a daemon thread: an HTTP request without a timeout cannot be interrupted)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def follow_job(client, job_id: str, interval: float = 1.0, out=print, timeout_s: float | None = None,
               unreachable_s: float = UNREACHABLE_S, request_timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """Print the job's logs as they grow until it ends; returns its final status. FollowStopped when the
    job has not ended within `timeout_s` (None: no limit) or the job server has not answered for
    `unreachable_s`; each request to the server is bounded too."""
    shown = 0
    started = answered = time.monotonic()
    while True:
        try:
            status, logs = bounded(lambda: (str(client.get_job_status(job_id)).split(".")[-1],
                                            client.get_job_logs(job_id)), request_timeout_s, f"job {job_id}")
            answered = time.monotonic()
        except (OSError, RuntimeError) as error:  # requests' errors are OSErrors; TimeoutError is one too
            if time.monotonic() - answered > unreachable_s:
                raise FollowStopped(f"job {job_id}: the job server has not answered for {unreachable_s:.0f} s "
                                    f"(last: {error}); the job may still be running") from error
            time.sleep(interval)
            continue
        if len(logs) > shown:
            out(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise FollowStopped(f"job {job_id}: still {status} after {timeout_s:.0f} s (--wait-timeout); it keeps "
                                f"running, stopped following it")
        time.sleep(interval)


def last_error_line(logs: str) -> str:
    """The job's own last word: its last line that names an error, else its last non-empty line."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or line.split(": ", 1)[0].endswith((".yaml", ".yml")):
            return line
    return lines[-1] if lines else ""


def job_exit_code(client, job_id: str) -> int | None:
    """The job's driver exit code when Ray knows it."""
    try:
        return getattr(client.get_job_info(job_id), "driver_exit_code", None)
    except Exception:  # an older server: no exit code
        return None
