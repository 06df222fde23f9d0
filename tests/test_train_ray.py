"""Training runs on Ray Train: 2 gloo workers, MLflow tracking, a killed worker resumes."""

import subprocess
import sys

import yaml
from conftest import REPO_ROOT
from mlflow.tracking import MlflowClient

from memlayers.platform.train.launcher import run_training
from memlayers.platform.train.run_config import load_run_config

TINY = REPO_ROOT / "studies" / "runs" / "tiny-memory-plus.yaml"


def tiny_config(tmp_path, **train):
    cfg = load_run_config(TINY, [f"train.{k}={v}" for k, v in train.items()] + [f"workdir={tmp_path}"])
    return cfg


def test_two_worker_memory_plus_run_is_tracked_in_mlflow(ray_local, tmp_path):
    cfg = tiny_config(tmp_path)
    result = run_training(cfg)
    assert result.status == "FINISHED", result.error
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "memory_plus-nano-4k-seed0"
    assert run.data.params["model.family"] == "memory_plus" and run.data.params["resources.workers"] == "2"
    for tag in ("family", "base", "memory_slots", "train_flops", "total_params", "active_params", "checkpoint"):
        assert tag in run.data.tags, tag
    assert run.data.tags["memory_slots"] == "4096"
    loss = client.get_metric_history(result.run_id, "loss")
    assert [m.step for m in loss] == list(range(5, 61, 5))
    assert loss[-1].value < loss[0].value
    for key in ("val_loss", "qa_exact_match", "qa_answer_nll", "tokens_per_s", "train_flops", "slot_fraction_read",
                "lr"):
        assert key in run.data.metrics, key


def test_a_killed_worker_resumes_from_its_checkpoint_in_the_same_mlflow_run(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, steps=40, checkpoint_every=10, eval_every=20, fail_at_step=25)
    result = run_training(cfg)
    assert result.status == "FINISHED", result.error
    assert (tmp_path / f".fault-injected-{result.run_id}").exists()   # the worker really died
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    runs = [r for r in runs if r.data.tags.get("memlayers.role") != "data"]  # the data set's own run aside
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    assert steps == list(range(5, 41, 5))          # continuous, each step once, ends at the plan
    assert result.metrics["step"] == 40


def test_a_bad_run_config_names_the_field_and_starts_nothing(tmp_path):
    bad = yaml.safe_load(TINY.read_text())
    bad["train"]["lr"] = "fast"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    for mutate, field in ((lambda d: d["train"].__setitem__("lr", "fast"), "train.lr"),
                          (lambda d: d["model"].__setitem__("colour", 1), "model.colour"),
                          (lambda d: d["model"].__setitem__("memory_slots", 1000), "model.memory.slots")):
        data = yaml.safe_load(TINY.read_text())
        mutate(data)
        path.write_text(yaml.safe_dump(data))
        proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "train", str(path),
                               "--workdir", str(tmp_path / "w")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert field in proc.stderr, proc.stderr
        assert not (tmp_path / "w").exists()


def test_a_two_worker_run_with_memory_parallel_two_completes_and_logs(ray_local, tmp_path):
    cfg = load_run_config(TINY, ["resources.memory_parallel=2", "train.steps=20", "train.checkpoint_every=10",
                                 "train.eval_every=10", f"workdir={tmp_path}"])
    result = run_training(cfg)
    assert result.status == "FINISHED", result.error
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.data.params["resources.memory_parallel"] == "2"
    assert "val_loss" in run.data.metrics and "loss" in run.data.metrics
    files = {p.name for p in __import__("pathlib").Path(result.checkpoint).iterdir()}
    assert {"state-rank0.pt", "values-t0-p2-r0.pt", "values-t0-p2-r1.pt"} <= files, files
