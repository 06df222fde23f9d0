"""The joint law L(N, M, D): each form is Chinchilla's law at M = 0 (objective and, on Epoch AI's
Chinchilla points, the approach-3 fit), recovers known parameters inside its bootstrap intervals,
and held-out error picks the form that generated the points."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import approx_fprime

from memlayers.platform.cli.main import main
from memlayers.platform.laws.chinchilla import problem as chinchilla_problem
from memlayers.platform.laws.io import chinchilla_csv_path
from memlayers.platform.laws.joint import JointProblem, fit_joint
from memlayers.platform.laws.joint_forms import FORMS, Inputs
from memlayers.platform.laws.joint_synthetic import TRUTH, synthetic_points

DATA = chinchilla_csv_path()
SEEDS = range(10)
BOOTSTRAP_SEED = 0


@pytest.fixture(scope="module")
def synthetic_fits():
    """Every form's grid under SEEDS; the first seed's fit with 100 bootstrap replicates."""
    fits = {}
    for name in FORMS:
        for seed in SEEDS:
            pts = synthetic_points(name, seed)
            fits[name, seed] = fit_joint(pts["N"], pts["M"], pts["D"], pts["loss"], seed=seed,
                                         bootstrap=100 if seed == BOOTSTRAP_SEED else 0)
    return fits


@pytest.mark.parametrize("name", sorted(FORMS))
def test_each_form_is_chinchillas_objective_at_no_memory(name):
    rng = np.random.default_rng(1)
    n, d = np.geomspace(1e7, 1e9, 12), rng.uniform(1e9, 1e11, 12)
    loss = 1.8 + 400 * n ** -0.34 + 2000 * d ** -0.37 + rng.normal(0, 0.01, 12)
    dense = chinchilla_problem(n, d, loss, delta=0.01)
    joint = JointProblem(FORMS[name], Inputs.from_points(n, np.zeros(12), d, 1e8, 1e8), np.log(loss), delta=0.01)
    theta = np.array([[6.0, 7.5, 0.6, 0.3, 0.35, 0.7, 0.4], [5.0, 8.0, 0.5, 0.4, 0.3, -1.0, 1.5]])
    f_dense, g_dense = dense.fun_grad(theta[:, :5])
    f_joint, g_joint = joint.fun_grad(theta)
    np.testing.assert_allclose(f_joint, f_dense, rtol=1e-12)
    np.testing.assert_allclose(g_joint[:, :5], g_dense, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g_joint[:, 5:], 0.0, atol=1e-12)  # the memory parameters drop out


@pytest.mark.parametrize("name", sorted(FORMS))
def test_gradient_is_the_derivative_of_the_objective(name):
    pts = synthetic_points(name, 3)
    prob = JointProblem(FORMS[name], Inputs.from_points(pts["N"], pts["M"], pts["D"], 8e7, 1.4e8),
                        np.log(pts["loss"]), delta=0.02)
    weights = np.random.default_rng(0).integers(0, 3, (1, pts["loss"].size)).astype(float)
    theta = FORMS[name].theta(TRUTH[name]) + np.random.default_rng(2).normal(0, 0.05, 7)
    g = prob.fun_grad(theta[None, :], weights)[1][0]
    numeric = approx_fprime(theta, lambda t: prob.fun_grad(t[None, :], weights)[0][0], 1e-7)
    np.testing.assert_allclose(g, numeric, rtol=1e-4, atol=1e-4 * np.abs(g).max())


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_file(), reason=f"Chinchilla data not found at {DATA} (set MEMLAYERS_CHINCHILLA_CSV)")
def test_epoch_chinchilla_points_give_approach_3_in_every_form(capsys):
    assert main(["fit", "--law", "joint", "--csv", str(DATA), "--n", "Model Size", "--c", "Training FLOP",
                 "--loss", "loss", "--drop-highest", "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_points"] == 240 and record["n_memory_points"] == 0
    assert set(record["forms"]) == set(FORMS)
    for name, entry in record["forms"].items():
        assert entry["params"]["alpha"] == pytest.approx(0.3473, abs=1e-3), name
        assert entry["params"]["beta"] == pytest.approx(0.3672, abs=1e-3), name
        assert entry["params"]["E"] == pytest.approx(1.8172, abs=2e-3), name
        assert entry["objective"] <= 1.01828e-3
        assert all(entry["params"][k] is None for k in FORMS[name].memory)  # not identified without memory rows
        assert entry["held_out"]["leave_one_base_out"]["log_rmse"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FORMS))
def test_true_parameters_fall_inside_their_intervals(synthetic_fits, name):
    entry = synthetic_fits[name, BOOTSTRAP_SEED]["forms"][name]
    assert entry["bootstrap"]["replicates"] == 100 and len(entry["replicates"]["values"]) == 100
    for key, true in TRUTH[name].items():
        low, high = entry["intervals"][key]
        assert low <= true <= high, (name, key, true, low, high)
    # the points were drawn with 0.5% noise: the fit's residuals are of that size
    assert 0.002 < entry["log_rmse"] < 0.008


@pytest.mark.slow
def test_held_out_error_picks_the_generating_form(synthetic_fits):
    picked = {name: sum(synthetic_fits[name, seed]["chosen"] == name for seed in SEEDS) for name in FORMS}
    assert all(count >= 8 for count in picked.values()), picked
    record = synthetic_fits["interaction", 0]
    assert record["selection"]["chosen"] == record["chosen"] and "held-out" in record["selection"]["why"]
    for entry in record["forms"].values():
        held = entry["held_out"]
        assert len(held["leave_one_base_out"]["per_base"]) == 5
        assert held["leave_largest_compute_out"]["held_out_points"] == 10
        assert held["score"] == pytest.approx(np.mean([held["leave_one_base_out"]["log_rmse"],
                                                       held["leave_largest_compute_out"]["log_rmse"]]))


def test_degenerate_input_is_refused_naming_the_field(tmp_path, capsys):
    pts = synthetic_points("additive", 0)
    with pytest.raises(ValueError, match="^M: 2 distinct memory size"):
        fit_joint(pts["N"], np.where(pts["M"] > 1e8, 1e8, pts["M"]).clip(0, 1e8) * (pts["M"] > 2e7),
                  pts["D"], pts["loss"])
    path = tmp_path / "points.csv"
    path.write_text("N,M,D,loss\n" + "\n".join(f"{n},{m},{d},{-1.0}" for n, m, d in
                                               zip(pts["N"], pts["M"], pts["D"])) + "\n")
    assert main(["fit", "--law", "joint", "--csv", str(path), "--n", "N", "--m", "M", "--d", "D"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss" in err


def test_memory_law_study_is_a_grid_the_joint_law_can_be_fitted_on():
    from conftest import REPO_ROOT

    from memlayers.platform.study.cells import expand
    from memlayers.platform.study.validate import load_study

    study = load_study(REPO_ROOT / "studies" / "memory-law.yaml")
    assert study.data.source == "shakespeare" and study.data.tokenizer == "bpe"
    cells = expand(study)
    bases = {c.base for c in cells}
    budgets = {c.budget["value"] for c in cells}
    assert len(bases) >= 3 and len(budgets) >= 2
    for base in bases:
        for budget in budgets:
            here = [c for c in cells if c.base == base and c.budget["value"] == budget]
            assert {c.memory_slots for c in here if c.family == "memory_plus"} >= {1024, 4096, 16384}
            assert [c.family for c in here].count("dense") == 1
    assert all(c.resources.gpus_per_worker == 0 for c in cells)


def test_a_memory_that_does_nothing_leaves_a_parameter_flagged_or_negligible():
    pts = synthetic_points("additive", 0, params={**TRUTH["additive"], "G": 1e-9})
    record = fit_joint(pts["N"], pts["M"], pts["D"], pts["loss"])
    for name, entry in record["forms"].items():
        p = entry["params"]
        # the largest memory's share of the loss it could change, roughly, in each form's terms
        effect = {"additive": lambda p=p: p["G"] / p["E"],
                  "effective_params": lambda p=p: p["kappa"] * 8 ** p["gamma"] * p["alpha"],
                  "interaction": lambda p=p: abs(p["delta"]) + abs(p["iota"])}[name]()
        assert "warning" in entry or effect < 0.05, (name, p)
    assert any("warning" in entry for entry in record["forms"].values())
