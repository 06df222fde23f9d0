"""A local session is private: its processes listen on loopback only (GCS, raylet, object manager,
workers, agents, gloo pairs), its token file is 0600, and its folder is refused when another user owns
it or others may write to it."""

import os
import stat
import tempfile

import psutil
import pytest
from conftest import REPO_ROOT

from memlayers.dashboards.mlflow_ui import exposure_warning
from memlayers.platform.cli.main import main
from memlayers.platform.cluster.local_launch import run_local
from memlayers.platform.cluster.ports import is_loopback
from memlayers.platform.cluster.session import UnsafeSessionDir, private_token, session_dir


def listeners(pids: set[int]) -> dict[tuple[str, int], str]:
    """(address, port) -> process name of every listening TCP socket of `pids`."""
    found = {}
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            found[(conn.laddr.ip, conn.laddr.port)] = name
    return found


def session_pids() -> set[int]:
    me = psutil.Process()
    return {me.pid} | {child.pid for child in me.children(recursive=True)}


def test_local_session_listens_on_loopback_only(ray_local, tmp_path):
    import ray

    @ray.remote(num_cpus=0)
    class Member:
        """One rank of a gloo group (self-contained: the workers cannot import this test module)."""

        def join(self, rank: int, world: int, store: str) -> list[str]:
            import psutil as ps
            import torch
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
            try:
                dist.all_reduce(torch.ones(1))
                return [c.laddr.ip for c in ps.Process().net_connections("inet") if c.status == ps.CONN_LISTEN]
            finally:
                dist.destroy_process_group()

    members = [Member.remote() for _ in range(2)]
    store = (tmp_path / "store").as_uri()
    # workers, an actor pair and their gloo group are up: the session's listeners are all it has
    addresses = ray.get([m.join.remote(rank, 2, store) for rank, m in enumerate(members)], timeout=120)
    found = listeners(session_pids())
    names = set(found.values())
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), found
    assert len(found) >= 5, found  # GCS, raylet (node and object manager), agents, workers
    assert all(is_loopback(ip) for ip, _ in found), {k: v for k, v in found.items() if not is_loopback(k[0])}
    assert all(addresses) and all(is_loopback(ip) for each in addresses for ip in each), addresses
    for member in members:
        ray.kill(member)
    # nothing of this is left for other programs started from here (`ray start` of another node refuses
    # to join while Ray's single-machine switch is on)
    import ray._private.ray_constants as constants

    assert constants.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert "GLOO_SOCKET_IFNAME" not in os.environ


def _listening_addresses(rank: int, world: int) -> list[str]:
    return [ip for (ip, _), _ in listeners({os.getpid()}).items()]


def test_run_local_ranks_listen_on_loopback_only():
    addresses = run_local(_listening_addresses, 2)
    assert all(addresses), addresses  # gloo's pairs listen: there is something to check
    assert all(is_loopback(ip) for each in addresses for ip in each), addresses


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_file_is_written_and_kept_0600(home):
    path = private_token()
    assert path == home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text()) == 64
    token = path.read_text()
    path.chmod(0o644)  # as Ray itself writes it
    assert private_token() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token  # an existing token is kept, only tightened


def test_session_dir_is_private_and_unsafe_ones_are_refused(tmp_path):
    path = session_dir(tmp_path)
    assert path == tmp_path / f"memlayers-ray-{os.getuid()}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    path.chmod(0o755)  # readable by others: ours, tightened
    assert stat.S_IMODE(session_dir(tmp_path).stat().st_mode) == 0o700
    path.chmod(0o777)
    with pytest.raises(UnsafeSessionDir, match="writable by others"):
        session_dir(tmp_path)
    path.chmod(0o700)
    if os.getuid() != 0:
        pytest.skip("handing a folder to another user needs root")
    os.chown(path, 4242, 4242)
    with pytest.raises(UnsafeSessionDir, match="belongs to uid 4242"):
        session_dir(tmp_path)


def test_study_run_refuses_a_world_writable_session_dir_before_anything_starts(tmp_path, monkeypatch, capsys):
    unsafe = tmp_path / f"memlayers-ray-{os.getuid()}"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what TMPDIR=tmp_path gives a new process
    workdir = tmp_path / "wd"
    code = main(["study", "run", str(REPO_ROOT / "studies" / "smoke.yaml"), "--workdir", str(workdir)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert str(unsafe) in lines[0] and "writable by others" in lines[0], lines
    assert not workdir.exists() and list(unsafe.iterdir()) == []


def test_dashboard_on_another_interface_warns_that_mlflow_has_no_authentication(tmp_path, monkeypatch, capsys):
    assert exposure_warning("127.0.0.1") is None and exposure_warning("::1") is None
    assert exposure_warning("localhost") is None
    for host in ("0.0.0.0", "::", "192.0.2.7", "my-laptop.example"):
        assert "no authentication" in exposure_warning(host), host
    monkeypatch.chdir(tmp_path)  # no study here: the command stops right after the warning, nothing served
    assert main(["dashboard", "nothing-here", "--host", "0.0.0.0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "warning: --host 0.0.0.0" in lines[0] and "no authentication" in lines[0], lines
