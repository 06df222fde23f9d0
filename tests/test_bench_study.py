"""`memlayers bench study`: a small study per cell runner on a real local Ray, numbers read back from MLflow."""

import json
import subprocess
import sys

import pytest


@pytest.mark.ray
@pytest.mark.slow
def test_bench_study_times_both_runners_side_by_side(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "bench", "study", "--cells", "2",
                           "--steps", "2", "--cpus", "2", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert set(out["runners"]) == {"trial", "train"} and out["runner"] == "trial"
    for runner in out["runners"].values():
        assert runner["cells"] == runner["finished"] == 2 and len(runner["rows"]) == 2
        assert runner["wall_s"] > runner["startup_s_per_cell"] > 0 and runner["step_s"] > 0
    assert out["startup_s_per_cell"] == out["runners"]["trial"]["startup_s_per_cell"]


def test_bench_study_refuses_an_unknown_runner(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "bench", "study", "--runners", "pool"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--runners from trial, train" in proc.stdout
