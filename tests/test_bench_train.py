"""`memlayers bench train` prints tokens/s for dense and Memory+ side by side."""

import json
import subprocess
import sys


def test_bench_train_prints_tokens_per_second_for_both_families():
    out = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "bench", "train", "--steps", "5",
                          "--batch-size", "8", "--seq-len", "32", "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = json.loads(out)
    assert [r["family"] for r in rows] == ["dense", "memory_plus"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert rows[1]["total_params"] > rows[0]["total_params"]


def test_bench_train_times_both_cpu_op_paths_round_robin_with_medians_and_spread():
    out = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "bench", "train", "--steps", "4",
                          "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--families", "dense,pkm",
                          "--cpu-ops", "auto,torch", "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = json.loads(out)
    assert [(r["family"], r["cpu_ops"]) for r in rows] == [("dense", "-"), ("pkm", "auto"), ("pkm", "torch")]
    for r in rows:
        assert r["steps"] == 4 and r["step_ms"] > 0 and r["cpu_ms"] > 0 and r["step_ms_iqr"] >= 0


def test_median_and_interquartile_range():
    from memlayers.platform.bench.timing import median_iqr

    assert median_iqr([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, 2.0)
    assert median_iqr([5.0]) == (5.0, 0.0)
