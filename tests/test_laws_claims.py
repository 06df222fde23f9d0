"""Claims checked seed by seed on hand-made run rows: holds only when every seed holds."""

from __future__ import annotations

import pytest

from memlayers.platform.laws.claims import check_claim, claim_line


def _row(family, seed, slots=0, **metrics):
    return {"family": family, "base": "nano", "seed": seed, "memory_slots": slots, "experts": 0, **metrics}


ROWS = [
    _row("dense", 0, qa_exact_match=0.50, val_loss=1.0), _row("dense", 1, qa_exact_match=0.60, val_loss=0.9),
    _row("memory_plus", 0, 1024, qa_exact_match=0.70, val_loss=0.8),
    _row("memory_plus", 0, 4096, qa_exact_match=0.80, val_loss=0.7),
    _row("memory_plus", 1, 1024, qa_exact_match=0.55, val_loss=0.85),  # below dense's 0.60 in seed 1
    _row("memory_plus", 1, 4096, qa_exact_match=0.90, val_loss=0.86),  # loss rises with memory in seed 1
    _row("pkm", 0, 1024, qa_exact_match=0.70), _row("pkm", 0, 4096, qa_exact_match=0.75),
]
VS_DENSE = {"id": "recall_vs_dense", "claim": "Memory+ recalls more than dense", "metric": "qa_exact_match",
            "kind": "pairwise", "subject": {"family": "memory_plus"}, "reference": {"family": "dense"}}


def test_pairwise_claim_takes_the_worst_pair_of_each_seed():
    result = check_claim(ROWS, VS_DENSE, bootstrap=200)
    assert result["seeds"] == [0, 1] and result["seeds_holding"] == [0]
    assert result["holds"] is False
    assert result["differences"] == pytest.approx({"0": 0.20, "1": -0.05})
    assert result["effect"] == pytest.approx(0.075)
    low, high = result["interval"]
    assert -0.05 - 1e-9 <= low <= result["effect"] <= high <= 0.20 + 1e-9
    assert claim_line(result).startswith("DOES NOT HOLD: Memory+ recalls more than dense")


def test_pairwise_claim_pairs_equal_memory_sizes_and_ties_count_with_at_least():
    vs_pkm = {**VS_DENSE, "id": "vs_pkm", "reference": {"family": "pkm"}}
    strict = check_claim(ROWS, vs_pkm)
    assert strict["seeds"] == [0] and strict["differences"] == pytest.approx({"0": 0.0}) and not strict["holds"]
    assert check_claim(ROWS, {**vs_pkm, "at_least": True})["holds"] is True


def test_trend_claim_lowers_the_loss_step_by_step():
    trend = {"id": "loss_vs_memory", "claim": "loss falls with memory", "metric": "val_loss", "kind": "trend",
             "subject": {"family": "memory_plus"}}
    result = check_claim(ROWS, trend)
    assert result["differences"] == pytest.approx({"0": 0.1, "1": -0.01})
    assert result["seeds_holding"] == [0] and not result["holds"]
    only_seed_0 = check_claim([r for r in ROWS if r["seed"] == 0], trend)
    assert only_seed_0["holds"] and only_seed_0["interval"] is None  # one seed: no interval to draw


def test_a_claim_without_its_cells_does_not_hold_and_says_why():
    result = check_claim(ROWS, {**VS_DENSE, "reference": {"family": "moe"}})
    assert result["holds"] is False and result["seeds"] == [] and "no seed" in result["note"]
    assert "no seed" in claim_line(result)
