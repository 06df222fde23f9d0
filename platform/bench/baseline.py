"""`memlayers bench baseline`: the reference per-step losses of a short deterministic run per family.

Every family (dense, MoE with token and expert choice, PKM, Memory+, PEER) trains a tiny model for
a few steps on synthetic facts, in process, on one thread, from a fixed seed. On a CPU these
losses are the same bit for bit from run to run, so `tests/test_baseline_losses.py` compares them
exactly with the files under `tests/assets/losses/`: a change that moves numerics (an init, an
op's order of summation, a data change) fails it. When a change is meant to move them, rewrite
the files with `memlayers bench baseline --write` and say why in the commit.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[2] / "tests" / "assets" / "losses"
STEPS = 12
MEMORY = {"memory_slots": 256, "memory": {"heads": 2, "topk": 8}}
FAMILIES: dict[str, dict[str, Any]] = {
    "dense": {"family": "dense"},
    "moe_token_choice": {"family": "moe", "experts": 4, "moe": {"routing": "token_choice"}},
    "moe_expert_choice": {"family": "moe", "experts": 4, "moe": {"routing": "expert_choice", "capacity_factor": 1.0}},
    "pkm": {"family": "pkm", **MEMORY},
    "memory_plus": {"family": "memory_plus", **MEMORY},
    "peer": {"family": "peer", **MEMORY},
}


def baseline_run(name: str) -> dict[str, Any]:
    """The run config (as a mapping) of one family's baseline run."""
    return {
        "name": f"baseline-{name}",
        "model": {"base": "nano", **FAMILIES[name]},
        "data": {"source": "facts", "seq_len": 32, "facts": {"people": 60, "renderings": 3}},
        "train": {"steps": STEPS, "batch_size": 8, "lr": 1e-2, "value_lr": 3e-2, "eval_every": STEPS,
                  "qa_eval_items": 16, "seed": 0},
    }


def baseline_losses(name: str, cache: Path) -> list[float]:
    """The per-step training losses of one family's baseline run, on one thread."""
    import torch  # deferred: `memlayers bench` lists its targets without importing torch

    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction split over threads may sum in another order
    try:
        cfg = run_config_from_dict(baseline_run(name))
        loop = RunLoop(cfg, prepare_data(cfg.data, cache))
        return [loop.train_step()["loss"] for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)


def asset_path(name: str, folder: Path = ASSETS) -> Path:
    return folder / f"{name}.json"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--write", action="store_true", help=f"rewrite the reference files under {ASSETS}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        print(f"--families: unknown {', '.join(unknown)} (expected {', '.join(FAMILIES)})")
        return 2
    with tempfile.TemporaryDirectory() as cache:
        for name in names:
            losses = baseline_losses(name, Path(cache))
            path = asset_path(name)
            stored = json.loads(path.read_text())["losses"] if path.exists() else None
            verdict = "no reference" if stored is None else ("same" if stored == losses else "DIFFERENT")
            print(f"{name:18s} first {losses[0]:.6f} last {losses[-1]:.6f}  vs {path.name}: {verdict}")
            if args.write:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"run": baseline_run(name), "losses": losses}, indent=1) + "\n")
    return 0
