"""Fits saved as JSON and CSV load back and predict the same; the command line writes them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from memlayers.platform.cli.main import main
from memlayers.platform.laws.io import load_fit, read_columns, save_fit, sha256_file
from memlayers.platform.laws.power import fit_power_law
from memlayers.platform.laws.result import LawFit


def test_save_and_load_round_trip(tmp_path):
    m = np.geomspace(1024, 1e6, 6)
    loss = 2.0 + 3.0 * m ** -0.3
    fit = fit_power_law(m, loss, law="memory")
    json_path, csv_path = save_fit(fit, tmp_path, {"M": m}, loss)
    assert json_path.name == "memory.json" and csv_path.name == "memory_points.csv"
    loaded = load_fit(json_path)
    assert loaded.params == fit.params and loaded.law == "memory"
    np.testing.assert_allclose(loaded.predict(np.array([5e4, 5e7])), fit.predict(np.array([5e4, 5e7])))
    np.testing.assert_allclose(loaded.predict(M=m), loss, rtol=1e-4)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["M", "observed", "predicted", "residual", "log_residual"]
    assert max(abs(float(r["residual"])) for r in rows) < 1e-3


def test_load_fit_rejects_what_is_not_a_fit(tmp_path):
    (tmp_path / "x.json").write_text('{"law": "chinchilla"}')
    with pytest.raises(ValueError, match="missing"):
        load_fit(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_fit(tmp_path / "y.json")
    with pytest.raises(ValueError, match="unknown law"):
        LawFit(law="cubic", params={}, objective=0.0, n_points=0, inputs=[])


def test_read_columns_names_the_bad_cell(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("C,loss\n1e15,3.0\n1e16,oops\n")
    with pytest.raises(ValueError, match=r"line 3, column 'loss'"):
        read_columns(path, ["C", "loss"])


def test_cli_compute_law_json_and_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    c = np.geomspace(1e15, 1e19, 8)
    loss = (1.9 + 60 * c ** -0.11) * np.exp(rng.normal(0, 0.002, c.size))
    path = tmp_path / "runs.csv"
    path.write_text("flops,val\n" + "".join(f"{float(a)!r},{float(b)!r}\n" for a, b in zip(c, loss))
                    + f"{1e16!r},9.5\n")
    out = tmp_path / "out"
    code = main(["fit", "--csv", str(path), "--law", "compute", "--c", "flops", "--loss", "val",
                 "--drop-highest", "1", "--bootstrap", "50", "--json", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    result = json.loads(stdout)  # one JSON object, nothing else on stdout
    assert result["law"] == "compute" and result["n_points"] == 8
    assert set(result["params"]) == {"A", "E", "alpha"} and set(result["intervals"]) == {"A", "E", "alpha"}
    assert result["params"]["alpha"] == pytest.approx(0.11, rel=0.15)
    assert result["provenance"] == {"file": str(path.resolve()), "sha256": sha256_file(path),
                                    "columns": {"C": "flops", "target": "val"}, "rows_read": 9, "dropped_highest": 1}
    assert (out / "compute.json").is_file() and (out / "compute_points.csv").is_file()
    assert load_fit(out / "compute.json").params == result["params"]

    code = main(["fit", "--csv", str(path), "--law", "compute", "--c", "flops", "--loss", "val", "--drop-highest", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "law compute: 8 points" in text and "alpha" in text
