"""`memlayers bench study`: what a study cell pays before and around its training steps.

Runs a small study (the smoke study's data and budget, `--cells` dense and Memory+ cells on the
nano base with distinct seeds) on a local Ray cluster started for it, and reads back from MLflow
when each cell's trial began (`memlayers.started_at`), when its first training step finished
(`memlayers.first_step_at`) and when its run ended. It prints, and with `--json` returns as one
object:

- `wall_s`: the whole `study run`, Ray start-up, fits and MLflow included;
- `startup_s_per_cell`: mean time from a cell's trial start to its first finished step (Tune
  trial, Train controller, worker actor, imports, data, MLflow run);
- `step_s`: time in training, summed over cells (first step to the end of the run, its final
  evaluation and checkpoint included);
- `cells`, and the per-cell rows.

`--runners trial,train` (the default) runs the study once per cell runner, side by side in one
run: `trial` trains each cell inside its Tune trial (`train/in_trial.py`), `train` fits a Ray
Train TorchTrainer per cell. The JSON object's top-level numbers are the first runner's;
`runners` holds every runner's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from memlayers.config_schema import read_yaml
from memlayers.platform.study.controller import run_study
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.validate import study_from_dict
from memlayers.platform.tracking.conventions import FIRST_STEP_TAG, STARTED_TAG
from memlayers.platform.train.run_config import RUNNERS

SMOKE = Path(__file__).resolve().parents[2] / "studies" / "smoke.yaml"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cells", type=int, default=4, help="cells in the study (even: dense and Memory+ per seed)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per cell")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    parser.add_argument("--runners", default="trial,train",
                        help=f"comma-separated cell runners, timed one after the other ({', '.join(RUNNERS[1:])})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _study(workdir: Path, cells: int, steps: int, runner: str):
    data = read_yaml(SMOKE)
    data["resources"]["runner"] = runner
    data.update(name="bench-study", workdir=str(workdir), report=False, fit={"enabled": False},
                budget={"steps": steps}, seeds=list(range(max(1, (cells + 1) // 2))))
    data["train"].update(eval_every=steps, checkpoint_every=steps, log_every=max(1, steps // 3))
    return study_from_dict(data)


def _rows(uri: str) -> list[dict]:
    rows = []
    for runs in cell_runs(uri, "bench-study").values():
        run = runs[-1]
        started, first = run.tags.get(STARTED_TAG), run.tags.get(FIRST_STEP_TAG)
        if started is None or first is None:
            continue
        ended = run.end_time / 1000 if run.end_time else None
        rows.append({"cell": run.name, "status": run.status, "startup_s": float(first) - float(started),
                     "step_s": ended - float(first) if ended else None})
    return rows


def measure(cells: int, steps: int, cpus: int | None, runner: str = "trial") -> dict:
    """One small study with cells trained by `runner`: wall time, start-up and training per cell."""
    with tempfile.TemporaryDirectory(prefix="memlayers-bench-study-") as tmp:
        study = _study(Path(tmp) / "wd", cells, steps, runner)
        start = time.perf_counter()
        result = run_study(study, num_cpus=cpus, out=lambda line: None, poll_interval=5.0)
        wall = time.perf_counter() - start
        rows = _rows(result.tracking_uri)
    startups = [r["startup_s"] for r in rows]
    return {"runner": runner, "cells": len(result.cells), "finished": sum(r["status"] == "FINISHED" for r in rows),
            "steps_per_cell": steps, "wall_s": wall,
            "step_s": sum(r["step_s"] or 0.0 for r in rows),
            "startup_s_per_cell": statistics.mean(startups) if startups else None,
            "startup_s_max": max(startups) if startups else None, "rows": rows}


def run(args: argparse.Namespace) -> int:
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if args.cells < 1 or args.steps < 1 or not runners or any(r not in RUNNERS[1:] for r in runners):
        print(f"memlayers bench study: --cells and --steps must be >= 1, --runners from {', '.join(RUNNERS[1:])}")
        return 2
    measured = [measure(args.cells, args.steps, args.cpus, runner) for runner in runners]
    out = {**measured[0], "runners": {m["runner"]: m for m in measured}}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        _print(measured)
    return 0 if all(m["finished"] == m["cells"] for m in measured) else 1


def _print(measured: list[dict]) -> None:
    first = measured[0]
    print(f"study of {first['cells']} cells x {first['steps_per_cell']} steps on a local Ray cluster, per cell runner")
    for out in measured:
        print(f"runner {out['runner']}:")
        for row in out["rows"]:
            print(f"  {row['cell']:<32} start-up {row['startup_s']:6.1f} s   training {row['step_s'] or 0:6.1f} s")
        print(f"  wall {out['wall_s']:.1f} s; in training steps {out['step_s']:.1f} s (summed over cells); "
              f"start-up per cell {out['startup_s_per_cell']:.1f} s mean, "
              f"{out['startup_s_max']:.1f} s max (target <= 5)")
