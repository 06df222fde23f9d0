"""A real two-node Ray cluster, an S3-compatible server and an MLflow server, all on 127.0.0.1.

For tests/test_cluster.py (and for measuring by hand: `python tests/two_nodes.py` brings it all up,
prints the settings and waits for Ctrl-C). The head has no CPUs; the worker node runs under
`unshare --mount` with private tmpfs over /tmp, /var/tmp and ~/.ray, so that the two nodes share no
scratch files (needs root, as CI runs). Every process is started in its own session and stopped by
process group; nothing else is touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from memlayers.platform.cluster.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PRIVATE_ON_WORKER = (Path("/tmp"), Path("/var/tmp"))  # what the worker node's mount namespace hides
VENV_BIN = Path(sys.executable).parent
BUCKET = "memlayers-test"


def can_build() -> str | None:
    """Why this machine cannot build the cluster, or None."""
    if os.geteuid() != 0:
        return "needs root (unshare --mount and tmpfs mounts), as CI runs"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    if not (VENV_BIN / "moto_server").exists():
        return "needs moto[server] (pip install -e '.[test]')"
    for path in (REPO_ROOT, VENV_BIN):
        if any(path.resolve().is_relative_to(hidden) for hidden in PRIVATE_ON_WORKER):
            return f"the checkout or its venv lies at {path}, under a folder the worker node's private mounts hide"
    return None


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal the process group; SIGKILL it if it outlives `timeout`."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        deadline = time.monotonic() + timeout  # children of the group outlive its leader for a moment
        while time.monotonic() < deadline and _group_alive(self.popen.pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class Cluster:
    root: Path                          # this cluster's own temp folder (logs, stores)
    env: dict[str, str]                 # what a client needs: token, S3 endpoint and credentials
    gcs: str = ""                       # 127.0.0.1:PORT of the head's GCS
    dashboard: str = ""                 # http://127.0.0.1:PORT (Ray Jobs)
    s3: str = ""                        # http://127.0.0.1:PORT (moto)
    tracking: str = ""                  # http://127.0.0.1:PORT (MLflow server)
    procs: dict[str, Proc] = field(default_factory=dict)
    workers: int = 0                    # worker nodes started so far
    alive_expected: int = 1             # nodes that should be alive now (the head)

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/studies"

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.root / f"{name}.log"
        handle = open(log, "wb")
        popen = subprocess.Popen(command, env=env or self.env, stdout=handle, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        handle.close()
        proc = self.procs[name] = Proc(name, popen, log)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def _wait_http(url: str, proc: Proc, timeout: float, ok_codes: tuple[int, ...] = (401, 403, 404)) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError as error:
            if error.code in ok_codes:
                return
        except OSError:
            pass
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not come up at {url}:\n{proc.tail()}")
        time.sleep(0.5)


def start_moto(cluster: Cluster) -> None:
    port = free_port()
    proc = cluster.start("moto", [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])
    cluster.s3 = f"http://127.0.0.1:{port}"
    cluster.env.update(AWS_ENDPOINT_URL=cluster.s3, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                       AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    _wait_http(f"{cluster.s3}/moto-api/", proc, 60)
    subprocess.run([sys.executable, "-c", f"import boto3; boto3.client('s3').create_bucket(Bucket='{BUCKET}')"],
                   env=cluster.env, check=True, timeout=60)


def start_mlflow(cluster: Cluster) -> None:
    """An MLflow tracking server that proxies artifacts into the bucket (clients need no bucket access)."""
    port = free_port()
    env = {**cluster.env, "MLFLOW_S3_ENDPOINT_URL": cluster.s3, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = cluster.start("mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                    "--workers", "1",
                                    "--backend-store-uri", f"sqlite:///{cluster.root / 'mlflow-server.db'}",
                                    "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], env=env)
    cluster.tracking = f"http://127.0.0.1:{port}"
    _wait_http(f"{cluster.tracking}/health", proc, 120)


def start_head(cluster: Cluster) -> None:
    """`ray start --head` with no CPUs: every cell's workers land on worker nodes."""
    gcs, dashboard = free_port(), free_port()
    command = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--include-dashboard", "true", "--num-cpus", "0", "--temp-dir", str(cluster.root / "head"),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats"]
    proc = cluster.start("head", command)
    cluster.gcs, cluster.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    _wait_http(f"{cluster.dashboard}/api/version", proc, 180)


def start_worker(cluster: Cluster, cpus: int = 2) -> Proc:
    """A worker node in its own mount namespace: private /tmp, /var/tmp and ~/.ray."""
    cluster.workers += 1
    ports = " ".join(f"--{flag} {free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port"))
    ray_home = Path.home() / ".ray"
    ray_home.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /var/tmp && mount -t tmpfs tmpfs {ray_home} && "
              f"exec {VENV_BIN / 'ray'} start --address={cluster.gcs} --node-ip-address 127.0.0.1 "
              f"--num-cpus={cpus} {ports} --disable-usage-stats --block")
    name = f"worker{cluster.workers}"
    proc = cluster.start(name, ["unshare", "--mount", "--propagation", "private", "bash", "-c", script])
    wait_nodes(cluster, cluster.alive_expected + 1, proc)
    cluster.alive_expected += 1
    return proc



def alive_nodes(cluster: Cluster) -> list[dict]:
    """The cluster's alive nodes, asked of the head's dashboard (no Ray client in this process)."""
    import json

    request = urllib.request.Request(f"{cluster.dashboard}/nodes?view=summary",
                                     headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        data = json.loads(response.read())
    summary = data.get("data", {}).get("summary", [])
    return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]


def wait_nodes(cluster: Cluster, count: int, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if len(alive_nodes(cluster)) >= count:
                return
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not join the cluster:\n{proc.tail()}")
        time.sleep(0.5)


def kill_worker(cluster: Cluster, proc: Proc, timeout: float = 60) -> None:
    """SIGKILL a worker node's whole process group (its raylet, workers, agents) and wait until the
    head sees it dead."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(timeout=30)
    cluster.alive_expected -= 1
    deadline = time.monotonic() + timeout
    while len(alive_nodes(cluster)) > cluster.alive_expected and time.monotonic() < deadline:
        time.sleep(0.5)


@contextlib.contextmanager
def two_nodes():
    """Head (0 CPUs) + one worker node (2 CPUs) + moto + MLflow server; stopped by process group after."""
    root = Path(tempfile.mkdtemp(prefix="mlc-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    cluster = Cluster(root=root, env=env)
    try:
        start_moto(cluster)
        start_mlflow(cluster)
        start_head(cluster)
        start_worker(cluster)
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    started = time.monotonic()
    with two_nodes() as c:
        print(f"up in {time.monotonic() - started:.1f} s; root {c.root}")
        for key in ("RAY_AUTH_TOKEN", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            print(f"export {key}={c.env[key]}")
        print(f"export RAY_AUTH_MODE=token\n# dashboard {c.dashboard}  gcs {c.gcs}  tracking {c.tracking}  "
              f"storage {c.storage}", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
