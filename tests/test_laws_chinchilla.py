"""Chinchilla approach 3 on Epoch AI's extraction of Figure 4: the published grid fit, bootstrap
interval widths, the frontier, and the `memlayers fit` command line around it.

The data file is not part of the project: it is read from ../shared/data/chinchilla/ beside the
repository or from $MEMLAYERS_CHINCHILLA_CSV, and these tests skip (with the path) without it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from memlayers.platform.laws.frontier import compute_optimal
from memlayers.platform.laws.io import chinchilla_csv_path, load_fit, sha256_file

DATA = chinchilla_csv_path()
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"Chinchilla data not found at {DATA} "
                                "(set MEMLAYERS_CHINCHILLA_CSV)")

EPOCH_ALPHA_WIDTH = 0.373 - 0.317
EPOCH_BETA_WIDTH = 0.415 - 0.331


@pytest.fixture(scope="module")
def cli_fit(tmp_path_factory):
    """One run of the real command: full grid, 200 bootstrap replicates, JSON and files."""
    out = tmp_path_factory.mktemp("chinchilla")
    cmd = [sys.executable, "-m", "memlayers.platform.cli.main", "fit", "--csv", str(DATA), "--law", "chinchilla",
           "--n", "Model Size", "--c", "Training FLOP", "--loss", "loss", "--drop-highest", "5",
           "--bootstrap", "200", "--seed", "0", "--json", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out


@needs_data
def test_reproduces_published_grid_fit(cli_fit):
    result, _ = cli_fit
    p = result["params"]
    assert result["law"] == "chinchilla" and result["n_points"] == 240
    assert p["alpha"] == pytest.approx(0.3473, abs=0.001)
    assert p["beta"] == pytest.approx(0.3672, abs=0.001)
    assert p["E"] == pytest.approx(1.8172, abs=0.002)
    assert p["A"] == pytest.approx(478, rel=0.02)
    assert p["B"] == pytest.approx(2143, rel=0.02)
    assert result["objective"] <= 1.01828e-3


@needs_data
def test_bootstrap_widths_match_epoch_within_factor_two(cli_fit):
    result, _ = cli_fit
    assert set(result["intervals"]) == {"A", "B", "E", "alpha", "beta"}
    for name, epoch_width in (("alpha", EPOCH_ALPHA_WIDTH), ("beta", EPOCH_BETA_WIDTH)):
        low, high = result["intervals"][name]
        assert low < result["params"][name] < high
        assert epoch_width / 2 <= high - low <= epoch_width * 2, (name, low, high)


@needs_data
def test_json_carries_provenance_and_files_round_trip(cli_fit):
    result, out = cli_fit
    assert result["provenance"]["sha256"] == sha256_file(DATA)
    assert result["provenance"]["rows_read"] == 245 and result["provenance"]["dropped_highest"] == 5
    assert result["fitter_version"]
    fit = load_fit(out / "chinchilla.json")
    with open(out / "chinchilla_points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 240
    n = np.array([float(r["N"]) for r in rows])
    d = np.array([float(r["D"]) for r in rows])
    predicted = np.array([float(r["predicted"]) for r in rows])
    np.testing.assert_allclose(fit.predict(n, d), predicted, rtol=1e-12)
    np.testing.assert_allclose(fit.predict(N=n, D=d), predicted, rtol=1e-12)
    residual = np.array([float(r["observed"]) - float(r["predicted"]) for r in rows])
    np.testing.assert_allclose(residual, [float(r["residual"]) for r in rows], atol=1e-12)
    # the five highest losses of the file are not among the points
    with open(DATA) as f:
        losses = sorted(float(r["loss"]) for r in csv.DictReader(f))
    assert max(float(r["observed"]) for r in rows) <= losses[-6]


@needs_data
def test_frontier_minimises_loss_at_fixed_compute(cli_fit):
    result, _ = cli_fit
    p = result["params"]
    budgets = np.array([1e21, 5.76e23])
    opt = compute_optimal(p, budgets)
    for c, n_opt, loss in zip(budgets, opt["n_opt"], opt["loss"]):
        along = minimize_scalar(lambda log_n, c=c: p["E"] + p["A"] * np.exp(-p["alpha"] * log_n)
                                + p["B"] * (c / (6 * np.exp(log_n))) ** -p["beta"],
                                bounds=(10, 40), method="bounded", options={"xatol": 1e-10})
        assert np.log(n_opt) == pytest.approx(along.x, abs=1e-4)
        assert loss == pytest.approx(along.fun, rel=1e-9)
    np.testing.assert_allclose(opt["n_opt"] * opt["d_opt"] * 6, budgets, rtol=1e-12)
    # N_opt grows as C^(beta / (alpha + beta)), a little over one half here
    assert result["details"]["frontier"]["n_exponent"] == pytest.approx(p["beta"] / (p["alpha"] + p["beta"]))
    assert 0.5 < result["details"]["frontier"]["n_exponent"] < 0.53


@needs_data
def test_bench_fit_reports_both_procedures(capsys):
    from memlayers.platform.cli.main import main

    assert main(["bench", "fit", "--plain-starts", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plain_starts_timed"] == 3 and report["scaled_to_starts"] == 4500
    assert report["plain_numeric_s"]["cpu"] > 0 and report["speedup_vs_plain"]["cpu"] > 0
    assert report["batched_full_grid"]["alpha"] == pytest.approx(0.3473, abs=0.001)
    assert report["batched_full_grid"]["objective"] <= report["plain_subset_best"]["objective"] + 1e-12
