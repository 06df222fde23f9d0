"""Checkpoints that fall back: commit markers, a refused checkpoint set aside with its reason and the one
before it used, and staging folders that another writer removes only once their writer is gone."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from test_train_in_trial import history, one_worker_config, write_checkpoint

from memlayers.platform.cluster import storage
from memlayers.platform.tracking.client import client_for
from memlayers.platform.tracking.conventions import SET_ASIDE_PREFIX
from memlayers.platform.train import loop as loop_module
from memlayers.platform.train.checkpoint_folder import STAGING, CheckpointFolder
from memlayers.platform.train.commit import COMMIT, CommitError, verify_commit, write_commit_marker
from memlayers.platform.train.in_trial import FolderSession, run_in_trial
from memlayers.platform.train.resume import resume_loop, sibling_candidates


def test_a_commit_marker_vouches_for_every_file_and_names_what_is_wrong(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "state-rank0.pt").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "tokenizer.json").write_text("{}")
    with pytest.raises(CommitError) as error:
        verify_commit(tmp_path)
    assert error.value.reason == "no-commit"
    write_commit_marker(tmp_path)
    assert sorted(verify_commit(tmp_path)) == ["state-rank0.pt", "sub/tokenizer.json"]
    write_commit_marker(tmp_path, ["sub/tokenizer.json"], writer=1)  # a second writer's own marker
    assert (tmp_path / "commit-rank1.json").is_file()
    (tmp_path / "state-rank0.pt").write_bytes(b"x" * 99)
    with pytest.raises(CommitError) as error:
        verify_commit(tmp_path)
    assert error.value.reason == "size"
    (tmp_path / "state-rank0.pt").write_bytes(b"y" * 100)
    with pytest.raises(CommitError) as error:
        verify_commit(tmp_path)
    assert error.value.reason == "checksum"
    (tmp_path / "sub" / "tokenizer.json").unlink()
    with pytest.raises(CommitError) as error:
        verify_commit(tmp_path)
    assert error.value.reason == "missing"
    (tmp_path / "sub" / "tokenizer.json").write_text("{}")
    (tmp_path / COMMIT).write_text("{not json")
    with pytest.raises(CommitError) as error:
        verify_commit(tmp_path)
    assert error.value.reason == "bad-marker"


class Loads:
    """A stand-in loop that records what it loaded and refuses a payload it cannot read."""
    built = 0

    def __init__(self) -> None:
        Loads.built += 1
        self.step = None

    def load(self, directory) -> None:
        self.step = json.loads((directory / "meta.json").read_text())["step"]  # "garbage" is no JSON


def test_resume_falls_back_past_refused_checkpoints_and_never_loads_an_unmarked_one(tmp_path):
    folder = CheckpointFolder(str(tmp_path / "ckpt"), keep=4)
    for step in (5, 10, 15):
        write_checkpoint(tmp_path / f"src{step}", step)
        folder.add(step, tmp_path / f"src{step}")
    newest = tmp_path / "ckpt" / "checkpoint_00000015"
    (newest / "meta.json").write_text(json.dumps({"step": 99}))  # same size, other bytes: the checksum refuses it
    second = tmp_path / "ckpt" / "checkpoint_00000010"
    (second / "meta.json").write_text("garbage")
    write_commit_marker(second)  # vouched for, but unreadable: the load refuses it
    unmarked = tmp_path / "ckpt" / "checkpoint_00000020"
    unmarked.mkdir()
    (unmarked / "meta.json").write_text(json.dumps({"step": 20}))  # a writer died before its marker
    session, refused = FolderSession(folder, torch.device("cpu")), []
    Loads.built = 0
    loop, location = resume_loop(session.checkpoints(), Loads, 0, lambda where, why: refused.append((where, why)))
    assert loop.step == 5 and location == folder.location(5) and session.checkpoint == location
    assert Loads.built == 3  # a fresh loop after each refused load: nothing half-loaded carries over
    assert [where.rsplit("/", 1)[1] for where, _ in refused] == ["checkpoint_00000015.bad-checksum",
                                                                 "checkpoint_00000010.bad-load"]
    assert "does not match the checksum" in refused[0][1] and "JSONDecodeError" in refused[1][1]
    assert folder.steps() == [5] and unmarked.is_dir()  # never loaded, never judged
    assert json.loads((tmp_path / "ckpt" / "checkpoint_00000015.bad-checksum" / "meta.json").read_text())["step"] == 99


def test_a_truncated_newest_checkpoint_costs_its_steps_not_the_cell(tmp_path, monkeypatch):
    cfg = one_worker_config(tmp_path, steps=12, checkpoint_every=4, eval_every=12, log_every=4)
    original, truncated = loop_module.RunLoop.train_step, []

    def train_step(self):  # right after checkpoint 8: its state file is cut short, then the loop fails
        if self.step == 8 and not truncated:
            state = checkpoint_folder_of(tmp_path) / "checkpoint_00000008" / "state-rank0.pt"
            state.write_bytes(state.read_bytes()[:1000])
            truncated.append(state)
            raise RuntimeError("injected fault after a truncated checkpoint")
        return original(self)

    monkeypatch.setattr(loop_module.RunLoop, "train_step", train_step)
    result = run_in_trial(cfg, workdir=tmp_path, job="job-t")
    assert truncated and result.status == "FINISHED", result.error
    assert [step for step, _ in history(tmp_path, result.run_id, "loss")] == [4, 8, 12]  # once each
    folder = checkpoint_folder_of(tmp_path)
    assert (folder / "checkpoint_00000008.bad-size").is_dir() and folder.joinpath("checkpoint_00000012").is_dir()
    tags = client_for(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).data.tags
    reason = tags[f"{SET_ASIDE_PREFIX}checkpoint_00000008.bad-size"]
    assert "state-rank0.pt holds 1000 bytes" in reason
    assert result.checkpoint.endswith("checkpoint_00000012") and result.metrics["step"] == 12


def checkpoint_folder_of(workdir):
    (folder,) = (workdir / "checkpoints").iterdir()
    return folder


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from memlayers.platform.train import checkpoint_folder as module
    root, source, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    copied = module.fsync_tree
    def wait_then_sync(folder):  # between the copy and the rename: the other writer sweeps now
        print("staged", flush=True)
        while not go.exists():
            time.sleep(0.05)
        copied(folder)
    module.fsync_tree = wait_then_sync
    module.CheckpointFolder(root).add(7, source)
    print("renamed", flush=True)
""")


def _writer(tmp_path, name: str) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "ckpt"), str(tmp_path / "src7"),
                               str(tmp_path / name)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "staged"
    return writer


def test_a_live_writers_staging_folder_is_left_alone_and_a_dead_writers_is_removed(tmp_path):
    for step in (7, 8, 9):
        write_checkpoint(tmp_path / f"src{step}", step)
    folder = CheckpointFolder(str(tmp_path / "ckpt"), keep=3)
    live = _writer(tmp_path, "go")
    try:
        folder.add(8, tmp_path / "src8")  # the other writer: sweeps staging folders after its rename
        assert len(list((tmp_path / "ckpt").glob(f"{STAGING}*"))) == 1
        (tmp_path / "go").touch()
        assert live.stdout.readline().strip() == "renamed" and live.wait(timeout=60) == 0
    finally:
        live.kill()
    assert folder.steps() == [7, 8]
    dead = _writer(tmp_path, "never")
    dead.kill()
    dead.wait(timeout=60)
    time.sleep(0.1)
    folder.add(9, tmp_path / "src9")
    assert not list((tmp_path / "ckpt").glob(f"{STAGING}*")) and folder.steps() == [7, 8, 9]


def test_ray_train_checkpoints_are_tried_newest_first_and_a_refused_one_set_aside(tmp_path):
    run = tmp_path / "ray_results" / "run"
    names = ["checkpoint_2026-12-01_10-00-00.000001", "checkpoint_2026-12-01_10-00-05.000001",
             "checkpoint_2026-12-01_10-00-09.000001"]
    for step, name in enumerate(names, start=1):
        write_checkpoint(run / name, step)
    (run / names[2] / "state-rank0.pt").write_bytes(b"cut")
    candidates = sibling_candidates(pafs.LocalFileSystem(), str(run / names[1]), contextlib.nullcontext)
    assert [c.location.rsplit("/", 1)[1] for c in candidates] == names[1::-1]  # the latest reported and older
    refused = []
    candidates = sibling_candidates(pafs.LocalFileSystem(), str(run / names[2]),
                                    lambda path: contextlib.nullcontext(Path(path)))
    loop, location = resume_loop(candidates, Loads, 0, lambda where, why: refused.append(where))
    assert loop.step == 2 and location == str(run / names[1])
    assert refused == [str(run / f"{names[2]}.bad-checksum")] and (run / f"{names[2]}.bad-checksum").is_dir()


def test_a_bucket_checkpoint_folder_lists_committed_checkpoints_and_sets_aside_by_copy(tmp_path, monkeypatch):
    from two_nodes import BUCKET, Cluster, start_moto

    if not (Path(sys.executable).parent / "moto_server").exists():
        pytest.skip("needs moto[server] (pip install -e '.[test]')")
    cluster = Cluster(root=tmp_path, env=dict(os.environ))
    try:
        start_moto(cluster)
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, cluster.env[key])
        folder = CheckpointFolder(f"s3://{BUCKET}/run/checkpoints", keep=2)
        for step in (5, 10):
            write_checkpoint(tmp_path / f"src{step}", step)
            folder.add(step, tmp_path / f"src{step}")
        storage.write_text(folder.location(15) + "/meta.json", "{}")  # an upload cut off before its marker
        assert folder.steps() == [5, 10]
        aside = folder.set_aside(10, "checksum")
        assert aside == f"s3://{BUCKET}/run/checkpoints/checkpoint_00000010.bad-checksum" and folder.steps() == [5]
        session = FolderSession(folder, torch.device("cpu"))
        loop, location = resume_loop(session.checkpoints(), Loads, 0, lambda where, why: None)
        assert loop.step == 5 and location == folder.location(5)
        assert storage.list_files(aside) == [COMMIT, "meta.json", "state-rank0.pt"]
    finally:
        cluster.stop_all()


def test_ranks_resume_from_one_checkpoint_only_when_all_of_them_loaded_it(tmp_path):
    import torch.distributed as dist

    from memlayers.platform.train.resume import all_ranks_agree

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert all_ranks_agree(True, torch.device("cpu")) and not all_ranks_agree(False, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    folder = CheckpointFolder(str(tmp_path / "ckpt"), keep=2)
    for step in (5, 10):
        write_checkpoint(tmp_path / f"src{step}", step)
        folder.add(step, tmp_path / f"src{step}")
    votes, refused = iter([False, True]), []  # another rank could not load the newest; all can load the one before
    loop, location = resume_loop(FolderSession(folder, torch.device("cpu")).checkpoints(), Loads, 0,
                                 lambda where, why: refused.append((where, why)), lambda ok: ok and next(votes))
    assert loop.step == 5 and location == folder.location(5)
    assert refused == [(str(tmp_path / "ckpt" / "checkpoint_00000010.bad-other-rank"),
                        "another rank could not load it")]
