"""Submit a study to a Ray cluster as a Ray Job that ships this version of memlayers.

`submit_study(file, "http://HEAD:8265")` builds a wheel of the project (`pip wheel --no-deps` of a
staged copy of the sources, so the checkout is left untouched), unpacks it, and submits a job whose
runtime env carries the unpacked wheel as a `py_modules` entry (uploaded to the cluster by the job
client; nothing is fetched from a package index, so it works offline) and the study file as its
`working_dir`. The entrypoint is `python -m memlayers.platform.cli.main study run <file> --address auto`;
the cluster must already have memlayers' dependencies (torch, ray, mlflow, ...).

What the job is given: the study's `--storage` and `--tracking-uri` (as command-line overrides), the
driver's own endpoint and credential variables (`AWS_*`, `MLFLOW_TRACKING_*`, `MLFLOW_S3_*`: the
standard way pyarrow, boto3 and MLflow read them) as job environment variables, and, unless
`--workdir` names one, a work directory under `~/memlayers/runs` on the head node (`MEMLAYERS_RUNS_ROOT`)
rather than Ray's per-session folder the job runs in.

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
import time
import zipfile
from pathlib import Path

import tomllib

JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
FORWARDED_ENV = ("AWS_", "MLFLOW_TRACKING_", "MLFLOW_S3_")  # prefixes of what the job carries from the driver
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
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".pytest_cache")
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


def job_env(environ: dict[str, str] | None = None, *, workdir: str | None = None) -> dict[str, str]:
    """The job's environment variables: JOB_ENV, the driver's forwarded endpoint/credential variables,
    and the runs root on the cluster when no workdir is given."""
    environ = dict(os.environ if environ is None else environ)
    env = dict(JOB_ENV)
    env.update({k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV)})
    if not workdir:
        env["MEMLAYERS_RUNS_ROOT"] = environ.get("MEMLAYERS_RUNS_ROOT", CLUSTER_RUNS_ROOT)
    return env


def submit_study(file: Path, address: str, *, workdir: str | None = None, storage: str | None = None,
                 tracking_uri: str | None = None, python: str = "python", extra_args: list[str] | None = None):
    """Submit `file` as a Ray Job at `address`; returns (job id, JobSubmissionClient)."""
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
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=" ".join(shlex.quote(part) for part in command),
            runtime_env={"working_dir": str(job_dir), "py_modules": [str(module_dir)], "env_vars": job_env(workdir=workdir)},
            submission_id=f"memlayers-{file.stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            metadata={"study_file": file.name, "wheel": wheel.name},
        )
    return job_id, client


def follow_job(client, job_id: str, interval: float = 1.0, out=print) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
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
