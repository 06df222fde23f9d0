"""Compute-equivalent multipliers against a dense (or MoE) compute law: exact on data built with
a known multiplier, unbounded runs flagged rather than crashing, bootstrap intervals around it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlayers.platform.laws.compare import compare_family, fit_constant, multipliers, reference_compute
from memlayers.platform.laws.io import dumps

REF = {"A": 60.0, "E": 1.8, "alpha": 0.11}


def ref_loss(c):
    return REF["E"] + REF["A"] * np.asarray(c) ** -REF["alpha"]


def test_reference_compute_inverts_the_law_and_flags_unreachable_losses():
    c = np.geomspace(1e15, 1e20, 6)
    np.testing.assert_allclose(reference_compute(REF, ref_loss(c)), c, rtol=1e-10)
    assert np.isinf(reference_compute(REF, [REF["E"], REF["E"] - 0.1])).all()


def test_per_run_multiplier_and_fitted_constant_are_exact_on_shifted_data():
    c = np.geomspace(1e15, 1e18, 5)
    loss = ref_loss(4.0 * c)  # this family reaches dense loss at a quarter of the compute
    np.testing.assert_allclose(multipliers(REF, c, loss), 4.0, rtol=1e-9)
    log_k, at_bound = fit_constant(REF, c, loss)
    assert np.exp(log_k) == pytest.approx(4.0, rel=1e-5) and not at_bound


def test_compare_family_with_bootstrap_and_an_unbounded_run():
    rng = np.random.default_rng(0)
    dense_c = np.geomspace(1e15, 1e19, 9)
    dense_l = ref_loss(dense_c) * np.exp(rng.normal(0, 0.002, dense_c.size))
    fam_c = np.geomspace(2e15, 5e18, 6)
    fam_l = ref_loss(2.5 * fam_c) * np.exp(rng.normal(0, 0.002, fam_c.size))
    out = compare_family(dense_c, dense_l, fam_c, fam_l, family="memory_plus", bootstrap=200, seed=1,
                         labels=[f"run{i}" for i in range(6)])
    assert out["k"] == pytest.approx(2.5, rel=0.15)
    low, high = out["k_interval"]
    assert low < out["k"] < high and high / low < 1.5
    assert [r["label"] for r in out["runs"]] == [f"run{i}" for i in range(6)]
    assert all(not r["unbounded"] and r["interval"][0] <= r["multiplier"] <= r["interval"][1] for r in out["runs"])

    below_floor = compare_family(dense_c, dense_l, [1e18], [1.5], family="memory_plus", reference="moe")
    run = below_floor["runs"][0]
    assert run["unbounded"] and run["multiplier"] is None and below_floor["reference"] == "moe"
    assert json.loads(dumps(below_floor))["runs"][0]["multiplier"] is None  # strict JSON, no Infinity


def test_compare_family_rejects_an_empty_family():
    with pytest.raises(ValueError, match="no runs"):
        compare_family(np.geomspace(1e15, 1e18, 4), ref_loss(np.geomspace(1e15, 1e18, 4)), [], [])
