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
