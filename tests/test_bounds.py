"""Every size a config can name is bounded before anything is built: huge values are refused at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO_ROOT

TINY = REPO_ROOT / "studies" / "runs" / "tiny-memory-plus.yaml"
SMOKE = REPO_ROOT / "studies" / "smoke.yaml"
HUGE = 10**13


@pytest.mark.parametrize("section,key,expected", [
    ("model", "memory_slots", "model.memory.slots: at most"),
    ("train", "steps", "train.steps: at most"),
    ("train", "batch_size", "train.batch_size: at most"),
    ("data", "seq_len", "data.seq_len: at most"),
])
def test_a_run_config_with_a_huge_size_is_refused_by_the_dry_run(tmp_path, section, key, expected):
    data = yaml.safe_load(TINY.read_text())
    data[section][key] = 10**14 if key == "memory_slots" else HUGE  # 10^14 = (10^7)^2: square, too big
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "train", str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("where,expected", [
    (("data", "facts", "people"), "data.facts.people: at most"),
    (("data", "facts", "values_per_attribute"), "data.facts.values_per_attribute: at most"),
    (("grid", "memory_sizes"), "grid.memory_sizes[0]: unknown memory size"),
    (("grid", "experts"), "grid.overrides"),
])
def test_a_study_with_a_huge_size_is_refused_within_seconds(tmp_path, where, expected):
    data = yaml.safe_load(SMOKE.read_text())
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = [HUGE] if where[-1] in ("memory_sizes", "experts") else HUGE
    if where[-1] == "experts":
        data["grid"]["families"] = ["moe"]
        expected = "experts"
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "memlayers.platform.cli.main", "study", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert time.monotonic() - start < 60
