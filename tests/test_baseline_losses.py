"""The numeric baseline: every family's per-step losses equal the stored reference bit for bit.

A change meant to move numerics rewrites the references with `memlayers bench baseline --write`.
"""

from __future__ import annotations

import json

import pytest

from memlayers.platform.bench.baseline import FAMILIES, asset_path, baseline_losses, baseline_run


@pytest.mark.parametrize("name", list(FAMILIES))
def test_losses_equal_the_stored_reference(name, tmp_path_factory):
    stored = json.loads(asset_path(name).read_text())
    assert stored["run"] == baseline_run(name), "the baseline run changed: rewrite the references"
    losses = baseline_losses(name, tmp_path_factory.getbasetemp() / "baseline-cache")
    assert losses == stored["losses"]


def test_a_changed_init_of_one_weight_moves_the_losses(monkeypatch, tmp_path_factory):
    """The comparison is sharp enough to see one weight's init change (the FFN's, 1% wider)."""
    import memlayers.models.feedforward as feedforward

    original = feedforward.trunc_normal_
    monkeypatch.setattr(feedforward, "trunc_normal_", lambda weight, std: original(weight, std * 1.01))
    losses = baseline_losses("dense", tmp_path_factory.getbasetemp() / "baseline-cache")
    assert losses != json.loads(asset_path("dense").read_text())["losses"]
