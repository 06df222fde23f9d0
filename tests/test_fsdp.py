"""FSDP2 of the dense weights beside column-sharded value tables, the per-GPU memory plan, a CLI run and export.

The equivalence runs train each family twice from one initialisation (`fsdp_workers.train_side_by_side`):
a single process on the global batch, and FSDP on 2 processes (data parallel 2) or 4 (memory-parallel
families 2 x 2, the others data parallel 4) on each rank's slice.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memlayers.platform.cli.main import main
from memlayers.platform.cluster.local_launch import run_local

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_workers import train_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
LOSS_TOL = 2e-5
PARAM_TOL = {"memory_plus": 1e-3}  # Adam on gradients at round-off level: DDP strays as far on the same steps
RUNS = {2: (("dense", 1), ("moe", 1), ("pkm", 1), ("memory_plus", 1), ("peer", 1)),
        4: (("dense", 1), ("moe", 1), ("pkm", 2), ("memory_plus", 2), ("peer", 1))}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_with_memory_parallelism_trains_like_one_process(world):
    ranks = run_local(train_families, world, RUNS[world], STEPS)
    for rank, families in enumerate(ranks):
        assert set(families) == {f for f, _ in RUNS[world]}
        for family, result in families.items():
            worst = result["worst"]
            assert worst["loss"] < LOSS_TOL, (world, rank, family, worst)
            assert worst["params"] < PARAM_TOL.get(family, 1e-5), (world, rank, family, worst)
            assert result["sharded_params"] > 0 and result["value_dtensors"] == 0, (family, result)
            assert len(result["losses"]) == STEPS
    assert all(r["gathered"] < PARAM_TOL.get(f, 1e-5) for f, r in ranks[0].items())  # the full state on rank 0


BIG = """name: big-dense
model: {base: 8b, family: dense}
data: {source: facts, tokenizer: word, seq_len: 2048, facts: {people: 300, renderings: 4}}
train: {steps: 10, batch_size: 8}
resources: {workers: 8, gpus_per_worker: 1, gpu_memory_gb: 80}
"""


def test_8b_dense_under_ddp_is_refused_and_fits_with_fsdp(tmp_path, capsys):
    run = tmp_path / "big.yaml"
    run.write_text(BIG)
    assert main(["train", str(run), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "resources: the plan needs ddp:" in captured.err and "fsdp: true would hold" in captured.err
    assert main(["train", str(run), "--dry-run", "--set", "resources.fsdp=true"]) == 0
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory per GPU")]
    assert len(plan) == 1 and "fsdp/8:" in plan[0], plan
    held = float(plan[0].split("fsdp/8:")[1].split()[0])
    assert 0 < held < 80
    assert main(["train", str(run), "--dry-run", "--set", "resources.fsdp=3"]) == 2
    assert capsys.readouterr().err.strip().endswith("resources.fsdp: must be true, false or a shard degree dividing "
                                                    "the 8 data-parallel ranks, got 3")


def test_study_validate_prints_memory_per_gpu_of_every_cell(capsys):
    assert main(["study", "validate", str(ROOT / "studies" / "paper-grid.yaml")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].rstrip().endswith("GPU memory")
    for row in rows[3:]:
        strategy, amount, unit = row.split()[-3:]
        assert strategy.startswith(("fsdp/", "ddp")) and unit == "GB" and "+" in amount, row


def test_bench_gpu_without_cuda_is_one_line(capsys):
    assert main(["bench", "gpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA device" in out


TINY = """name: tiny-fsdp
model: {base: nano, family: memory_plus, memory_slots: 4k, memory: {heads: 2, topk: 8}}
data: {source: facts, tokenizer: word, seq_len: 32, facts: {people: 50, renderings: 2}}
train: {steps: 4, batch_size: 4, eval_every: 4, checkpoint_every: 4, log_every: 2, eval_batches: 1, qa_eval_items: 4}
resources: {workers: 2, fsdp: true, memory_parallel: 2}
"""


@pytest.mark.slow
@pytest.mark.ray
def test_train_with_fsdp_on_two_workers_then_export_the_run(tmp_path):
    (tmp_path / "run.yaml").write_text(TINY)
    cli = [sys.executable, "-m", "memlayers.platform.cli.main"]
    train = subprocess.run([*cli, "train", "run.yaml", "--workdir", "wd"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    run_id = next(line.split()[1].rstrip(":") for line in train.stdout.splitlines() if line.startswith("run "))
    export = subprocess.run([*cli, "export", run_id, "--tracking-uri", f"sqlite:///{tmp_path}/wd/mlflow.db",
                             "--out", "exported"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    out = tmp_path / "exported"
    assert json.loads((out / "config.json").read_text())["run"]["resources"]["fsdp"] is True
    assert len(list(out.glob("*.safetensors"))) == 2
