"""The paper's full comparison set in one CPU study: dense, expert-choice MoE and PEER cells
validate, expand FLOP-matched by the accounting, and run to FINISHED on local Ray."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from memlayers.platform.study.cells import expand
from memlayers.platform.study.progress import cell_runs
from memlayers.platform.study.validate import load_study

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"


def _families_study(tmp_path, budget: dict) -> object:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(name="families", workdir=str(tmp_path / "wd"), fit={"enabled": False}, budget=budget)
    data["grid"] = {"bases": ["nano"], "families": ["dense", "moe", "peer", "memory_plus"],
                    "memory_sizes": [1024], "experts": [4],
                    "moe": {"routing": "expert_choice", "capacity_factor": 1.0},
                    "overrides": {"peer": {"memory": {"heads": 2, "topk": 4}}}}
    path = tmp_path / "families.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study(path)


def test_peer_and_expert_choice_cells_validate_and_are_flop_matched(tmp_path):
    cells = expand(_families_study(tmp_path, {"flops": 3e9}))
    assert [c.family for c in cells] == ["dense", "moe", "peer", "memory_plus"]
    peer = next(c for c in cells if c.family == "peer")
    assert peer.memory_slots == 1024 and peer.active_params < peer.params
    assert next(c for c in cells if c.family == "moe").model.moe["routing"] == "expert_choice"
    for cell in cells:  # a FLOP budget is a ceiling that every cell spends to within one step
        assert 3e9 - cell.flops_per_token * cell.train.batch_size * 32 < cell.train_flops <= 3e9


@pytest.mark.slow
def test_peer_and_expert_choice_cells_run_on_cpu(tmp_path, ray_local):
    from memlayers.platform.study.controller import run_study

    result = run_study(_families_study(tmp_path, {"steps": 4}), poll_interval=0.5)
    assert set(result.states.values()) == {"done"}, result.results
    runs = cell_runs(result.tracking_uri, "families")
    for cell in result.cells:
        (run,) = runs[cell.id]
        assert run.status == "FINISHED" and run.metrics["loss"] > 0
