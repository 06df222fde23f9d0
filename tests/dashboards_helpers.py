"""Helpers of the dashboard tests: a study store built like the controller's, and a report page check.

`build_study` writes a finished study into a real SQLite MLflow store the way the controller and
trainer log it.

Parent run (memlayers.role=study) with the study YAML as an artifact; one child run per cell
(memlayers.role=cell, study, cell, the trainer's tags, flattened-config params) with per-step
histories of loss, tokens, train_flops, lr and, for memory families, slot usage; eval metrics at
eval steps. Losses follow a known compute law per family so fitted laws have something to find.
One cell failed with a reason, as a crashed cell is recorded.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from pathlib import Path

from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.conventions import sqlite_uri
from memlayers.platform.tracking.study_ref import StudyRef

STUDY_YAML = """name: {name}
data: {{source: facts, tokenizer: word, seq_len: 16}}
grid:
  bases: [nano, micro, tiny]
  families: [dense, memory_plus, pkm, moe]
  memory_sizes: [4k, 16k, 64k]
budget: {{tokens: 200000}}
seeds: [0]
"""

# (family, base, memory_slots, experts, train_flops, status)
CELLS = [
    ("dense", "nano", 0, 0, 1.0e12, "FINISHED"),
    ("dense", "micro", 0, 0, 2.2e12, "FINISHED"),
    ("dense", "tiny", 0, 0, 4.1e12, "FINISHED"),
    ("dense", "small", 0, 0, 9.0e12, "FINISHED"),
    ("moe", "nano", 0, 4, 1.1e12, "FINISHED"),
    ("pkm", "nano", 16384, 0, 1.05e12, "FINISHED"),
    ("memory_plus", "nano", 4096, 0, 1.02e12, "FINISHED"),
    ("memory_plus", "nano", 16384, 0, 1.06e12, "FINISHED"),
    ("memory_plus", "nano", 65536, 0, 1.12e12, "FINISHED"),
    ("memory_plus", "nano", 262144, 0, 1.2e12, "FAILED"),
]
MULTIPLIER = {"dense": 1.0, "moe": 1.3, "pkm": 1.6, "memory_plus": 2.0}
SIZE_NAMES = {4096: "4k", 16384: "16k", 65536: "64k", 262144: "256k"}


def final_loss(family: str, flops: float, slots: int) -> float:
    """L = 1.6 + 40·(k·C)^-0.15, with k growing with the memory size for memory families."""
    k = MULTIPLIER[family] * (1.0 + 0.25 * math.log2(slots / 4096) if slots else 1.0)
    return 1.6 + 40.0 * (k * flops) ** -0.15


def run_name(family: str, base: str, slots: int, experts: int, seed: int = 0) -> str:
    parts = [family, base] + ([SIZE_NAMES[slots]] if slots else []) + ([f"{experts}x"] if experts else [])
    return "-".join(parts + [f"seed{seed}"])


def build_study(root: Path, name: str = "smoke", steps: int = 20) -> StudyRef:
    """Write the study into `root` (mlflow.db, mlartifacts/, the study file) and return its ref."""
    from mlflow.entities import Metric, Param

    root.mkdir(parents=True, exist_ok=True)
    study_file = root / f"{name}.yaml"
    study_file.write_text(STUDY_YAML.format(name=name))
    uri = sqlite_uri(root)
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(uri, name, root / "mlartifacts")
    parent = tracking.create_run(uri, experiment_id, f"study-{name}", {"memlayers.role": "study", "study": name})
    client.log_artifact(parent, str(study_file))
    stamp = int(time.time() * 1000)
    tokens_per_step = 10_000
    for family, base, slots, experts, flops, status in CELLS:
        cell_id = hashlib.sha1(f"{family}{base}{slots}{experts}".encode()).hexdigest()[:10]
        tags = {"memlayers.role": "cell", "study": name, "cell": cell_id, "family": family, "base": base,
                "memory_slots": str(slots), "experts": str(experts), "seed": "0", "train_flops": f"{flops:.6g}",
                "train_tokens": str(tokens_per_step * steps), "total_params": str(80_000 + slots * 32),
                "active_params": str(80_000), "memory_value_params": str(slots * 32)}
        run_id = tracking.create_run(uri, experiment_id, run_name(family, base, slots, experts), tags, parent)
        params = [Param("model.family", family), Param("model.base", base), Param("train.seed", "0")]
        last = final_loss(family, flops, slots)
        logged = steps if status == "FINISHED" else steps // 2
        metrics = []
        for step in range(1, logged + 1):
            frac = step / steps
            loss = last + (6.0 - last) * math.exp(-5.0 * frac)
            values = {"loss": loss, "tokens": step * tokens_per_step, "train_flops": flops * frac,
                      "lr": 3e-3 * min(1.0, 5 * frac)}
            if slots:
                values["slot_fraction_read"] = 1.0 - math.exp(-3.0 * frac) * (1.0 - 0.05)
                values["slot_gini"] = 0.2 + 0.7 * math.exp(-3.0 * frac)
            if step % 5 == 0:
                values["val_loss"] = loss + 0.05
                values["qa_answer_nll"] = 3.0 * (loss - 1.5)
                values["qa_exact_match"] = max(0.0, min(1.0, 1.2 - 0.35 * loss))
            metrics += [Metric(k, float(v), stamp + step, step) for k, v in values.items()]
        client.log_batch(run_id, metrics=metrics, params=params)
        if status == "FAILED":
            tracking.set_tags(uri, run_id, {"failure_reason": "FloatingPointError: loss is NaN at step 10"})
        tracking.set_status(uri, run_id, status)
    tracking.set_status(uri, parent, "FINISHED")
    return StudyRef(name=name, workdir=root.resolve(), tracking_uri=uri, file=None)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def inspect_report(report: Path, screenshot: Path) -> dict:
    """Open the report from disk in headless Chromium; what a reader would see, as plain data."""
    from browser import Chromium

    with Chromium(width=1280, height=900) as browser:
        browser.open(report.as_uri())
        page = {
            "sections": browser.evaluate("[...document.querySelectorAll('main > section')].map(s => s.id)"),
            "images": browser.evaluate("[...document.images].map(i => ({ok: i.complete, w: i.naturalWidth, "
                                       "h: i.naturalHeight, alt: i.alt}))"),
            "grid": browser.evaluate("[...document.querySelectorAll('#grid-table tbody tr')].map(r => r.innerText)"),
            "text": browser.evaluate("document.body.innerText"),
            "requested": browser.requested_urls(),
        }
        browser.screenshot(screenshot)
    page["screenshot_size"] = png_size(screenshot.read_bytes())
    page["network"] = [u for u in page["requested"] if not u.startswith(("file:", "data:"))]
    return page
