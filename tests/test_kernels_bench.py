"""The kernel and memory benchmarks run end to end at tiny sizes (numbers are printed, not asserted)."""

import json
import subprocess
import sys

from memlayers.platform.bench.memory import _ratios

MEMLAYERS = [sys.executable, "-m", "memlayers.platform.cli.main"]


def test_bench_memory_json_rows_from_child_processes_with_the_peer():
    proc = subprocess.run(MEMLAYERS + ["bench", "memory", "--json", "--sizes", "1024", "--steps", "1",
                                       "--warmup", "0", "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["impl"], r["slots"]) for r in rows] == [("memlayers", 1024), ("lucidrains", 1024)]
    for row in rows:
        assert set(row) == {"impl", "slots", "step_ms", "step_ms_iqr", "peak_rss_gb", "rounds"}  # the JSON schema
        assert row["step_ms"] > 0 and 0.05 < row["peak_rss_gb"] < 8 and row["rounds"] == 1


def test_bench_memory_table_and_size_ratio():
    proc = subprocess.run(MEMLAYERS + ["bench", "memory", "--sizes", "1024,4096", "--steps", "1", "--warmup", "0",
                                       "--optimizer", "lazy_adam", "--skip-peer", "--rounds", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "lazy_adam" in proc.stdout and "round 2/2: memlayers 4096" in proc.stdout  # the second round descends
    assert "ours 4096 / ours 1024 slots: time x" in proc.stdout


def _round(*rows):
    return [{"impl": i, "slots": s, "step_ms": ms, "cpu_ms": ms, "peak_rss_gb": gb} for i, s, ms, gb in rows]


def test_ratio_lines_take_each_ratio_within_a_round_and_report_the_median_over_rounds():
    rounds = [_round(("memlayers", 16, 100.0, 1.0), ("lucidrains", 16, 100.0, 1.0),
                     ("memlayers", 64, 150.0, 2.0), ("lucidrains", 64, 3000.0, 10.0)),
              # a slower machine in this round: every row 2x, the within-round ratios unchanged
              _round(("memlayers", 16, 200.0, 1.0), ("lucidrains", 16, 200.0, 1.0),
                     ("memlayers", 64, 300.0, 2.0), ("lucidrains", 64, 6000.0, 10.0)),
              _round(("memlayers", 16, 100.0, 1.0), ("lucidrains", 16, 100.0, 1.0),
                     ("memlayers", 64, 210.0, 2.0), ("lucidrains", 64, 4200.0, 10.0))]
    lines = _ratios(rounds, [16, 64])
    assert lines[0].startswith("ours 64 / ours 16 slots: time x1.50 [1.50, 2.10]") and "RSS x2.00" in lines[0]
    assert lines[1] == "lucidrains 64 / lucidrains 16 slots: time x30.00 [30.00, 42.00]"
    assert lines[2].startswith("lucidrains / ours at 64 slots: time x20.00 [20.00, 20.00]") and "RSS x5.00" in lines[2]


def test_bench_memory_refuses_no_rounds():
    proc = subprocess.run(MEMLAYERS + ["bench", "memory", "--sizes", "1024", "--skip-peer", "--rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rounds" in proc.stderr


def test_bench_memory_refuses_non_square_sizes():
    proc = subprocess.run(MEMLAYERS + ["bench", "memory", "--sizes", "1000", "--skip-peer"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "perfect square" in proc.stderr


def test_bench_kernels_on_cpu_runs_the_interpreter_check():
    proc = subprocess.run(MEMLAYERS + ["bench", "kernels"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU" in proc.stdout
    fp32 = [line for line in proc.stdout.splitlines() if line.startswith("fp32 max error")]
    assert fp32 and float(fp32[0].split()[3]) < 1e-5
