"""A study cell trained inside its Tune trial (train/in_trial.py): the same numbers as on Ray Train,
checkpoints in a folder of its own, restarts within the cell's own max_failures, attempts counted."""

import json
import os

import pytest
import torch
from conftest import REPO_ROOT

from memlayers.platform.tracking.client import client_for, create_run, ensure_experiment, set_tags
from memlayers.platform.tracking.conventions import ATTEMPT_TAG, ATTEMPTS_TAG
from memlayers.platform.train import loop as loop_module
from memlayers.platform.train.checkpoint_folder import CheckpointFolder
from memlayers.platform.train.commit import write_commit_marker
from memlayers.platform.train.in_trial import FolderSession, run_in_trial
from memlayers.platform.train.launcher import run_training
from memlayers.platform.train.run_config import ConfigError, load_run_config

TINY = REPO_ROOT / "studies" / "runs" / "tiny-memory-plus.yaml"


def one_worker_config(tmp_path, **train):
    overrides = [f"train.{k}={v}" for k, v in train.items()] + [f"workdir={tmp_path}", "resources.workers=1"]
    return load_run_config(TINY, overrides + ["tracking.system_metrics=false"])


def history(tmp_path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = client_for(f"sqlite:///{tmp_path}/mlflow.db")
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def write_checkpoint(directory, step: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state-rank0.pt").write_bytes(b"x" * step)
    (directory / "meta.json").write_text(json.dumps({"step": step}))
    write_commit_marker(directory)


def newest(session: FolderSession):
    """The newest committed checkpoint (what a resume tries first), or None."""
    candidate = next(session.checkpoints(), None)
    return None if candidate is None else candidate


def test_checkpoint_folder_keeps_the_newest_complete_checkpoints(tmp_path):
    folder = CheckpointFolder(str(tmp_path / "ckpt"), keep=2)
    session = FolderSession(folder, torch.device("cpu"))
    assert newest(session) is None and session.checkpoint is None
    for step in (3, 6, 9):
        write_checkpoint(tmp_path / f"src{step}", step)
        assert folder.add(step, tmp_path / f"src{step}") == str(tmp_path / "ckpt" / f"checkpoint_{step:08d}")
    assert folder.steps() == [6, 9]
    (tmp_path / "ckpt" / "checkpoint_00000012").mkdir()  # a checkpoint without its commit marker does not count
    (tmp_path / "ckpt" / "checkpoint_00000012" / "state-rank0.pt").write_bytes(b"partial")
    (tmp_path / "ckpt" / "checkpoint_00000012" / "meta.json").write_text(json.dumps({"step": 12}))
    with newest(session).open() as directory:
        assert json.loads((directory / "meta.json").read_text())["step"] == 9
    assert session.checkpoint == str(tmp_path / "ckpt" / "checkpoint_00000009")
    stale = tmp_path / "ckpt" / ".staging-4194999-1-abc-nowhere"  # a writer on another host, gone long ago
    stale.mkdir()
    (stale / "state-rank0.pt").write_bytes(b"partial")
    os.utime(stale, (1.0, 1.0))
    write_checkpoint(tmp_path / "again", 10)  # a replayed step replaces the earlier copy
    folder.add(9, tmp_path / "again")
    assert json.loads((tmp_path / "ckpt" / "checkpoint_00000009" / "meta.json").read_text())["step"] == 10
    assert not list((tmp_path / "ckpt").glob(".staging-*"))


@pytest.mark.slow
def test_a_cell_trained_in_its_trial_logs_the_same_numbers_as_on_ray_train(ray_local, tmp_path):
    in_trial = run_in_trial(one_worker_config(tmp_path / "trial", steps=20, checkpoint_every=10, eval_every=20),
                            workdir=tmp_path / "trial", job="job-a")
    on_train = run_training(one_worker_config(tmp_path / "train", steps=20, checkpoint_every=10, eval_every=20),
                            workdir=tmp_path / "train")
    assert in_trial.status == on_train.status == "FINISHED", (in_trial.error, on_train.error)
    for key in ("loss", "val_loss", "qa_answer_nll"):
        assert history(tmp_path / "trial", in_trial.run_id, key) == history(tmp_path / "train", on_train.run_id, key)
    tags = client_for(f"sqlite:///{tmp_path}/trial/mlflow.db").get_run(in_trial.run_id).data.tags
    assert tags["checkpoint"].endswith("checkpoint_00000020") and tags[ATTEMPTS_TAG] == "1"
    assert json.loads((tmp_path / "trial" / tags["checkpoint"] / "meta.json").read_text())["step"] == 20


def _fail_once_at(monkeypatch, step: int) -> list[int]:
    """Make the loop raise once, right before `step` (an in-process fault, not a dead process)."""
    raised: list[int] = []
    original = loop_module.RunLoop.train_step

    def train_step(self):
        if self.step + 1 == step and not raised:
            raised.append(step)
            raise RuntimeError(f"injected fault at step {step}")
        return original(self)

    monkeypatch.setattr(loop_module.RunLoop, "train_step", train_step)
    return raised


def test_a_failing_loop_restarts_from_its_checkpoint_and_logs_each_step_once(tmp_path, monkeypatch):
    raised = _fail_once_at(monkeypatch, 16)
    cfg = one_worker_config(tmp_path, steps=20, checkpoint_every=10, eval_every=20)
    result = run_in_trial(cfg, workdir=tmp_path, job="job-b")
    assert raised == [16] and result.status == "FINISHED", result.error
    assert [step for step, _ in history(tmp_path, result.run_id, "loss")] == [5, 10, 15, 20]
    tags = client_for(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).data.tags
    assert tags[ATTEMPTS_TAG] == "2" and tags[ATTEMPT_TAG] == "job-b"
    assert result.metrics["step"] == 20


def test_no_restart_left_records_the_failure_and_its_reason(tmp_path, monkeypatch):
    _fail_once_at(monkeypatch, 6)
    cfg = one_worker_config(tmp_path, steps=20, checkpoint_every=10, eval_every=20)
    cfg.resources.max_failures = 0
    result = run_in_trial(cfg, workdir=tmp_path, job="job-c")
    assert result.status == "FAILED" and "injected fault at step 6" in result.error
    run = client_for(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.info.status == "FAILED" and "injected fault" in run.data.tags["failure_reason"]


def test_a_job_whose_trials_died_too_often_is_failed_without_training(tmp_path):
    cfg = one_worker_config(tmp_path, steps=20)
    cfg.resources.max_failures = 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = ensure_experiment(uri, cfg.name, tmp_path / "mlartifacts")
    run_id = create_run(uri, experiment, "memory_plus-nano-4k-seed0", {})
    set_tags(uri, run_id, {ATTEMPT_TAG: "job-d", ATTEMPTS_TAG: "2"})  # two trials of this job died
    cfg.tracking.run_id, cfg.tracking.uri = run_id, uri
    result = run_in_trial(cfg, workdir=tmp_path, job="job-d")
    assert result.status == "FAILED" and "died 2 times" in result.error
    assert history(tmp_path, run_id, "loss") == []
    set_tags(uri, run_id, {ATTEMPT_TAG: "job-e"})  # another job (a re-run study) starts its count afresh
    assert run_in_trial(cfg, workdir=tmp_path, job="job-d-next").status == "FINISHED"


@pytest.mark.parametrize("resources, message", [
    ({"runner": "trial", "workers": 2}, "'trial' trains one worker"),
    ({"runner": "nearby"}, "must be one of auto, trial, train"),
])
def test_runner_is_validated_and_named(tmp_path, resources, message):
    with pytest.raises(ConfigError) as error:
        load_run_config(TINY, [f"resources.{k}={v}" for k, v in resources.items()])
    assert "resources.runner" in str(error.value) and message in str(error.value)


def test_auto_trains_one_worker_in_its_trial_and_more_on_ray_train(tmp_path):
    assert one_worker_config(tmp_path).resources.in_trial()
    assert not load_run_config(TINY, []).resources.in_trial()
    assert not load_run_config(TINY, ["resources.workers=1", "resources.runner=train"]).resources.in_trial()


def test_a_trial_holds_the_cpus_of_the_cell_it_trains_and_retries_within_the_largest_budget(tmp_path):
    from memlayers.platform.study.trials import DRIVER_RESOURCES, trial_resources, trial_retries
    inside = one_worker_config(tmp_path)
    inside.resources.max_failures = 3
    gpu = load_run_config(TINY, ["resources.workers=1", "resources.gpus_per_worker=1", "resources.max_failures=1"])
    on_train = load_run_config(TINY, ["resources.max_failures=5"])  # 2 workers: Ray Train restarts itself
    assert trial_resources(inside) == {"cpu": 1.0}
    assert trial_resources(gpu) == {"cpu": 1.0, "gpu": 1.0}
    assert trial_resources(on_train) == DRIVER_RESOURCES and DRIVER_RESOURCES["cpu"] == 0
    assert trial_retries([inside, gpu, on_train]) == 3 and trial_retries([on_train]) == 0
