"""fit_study on synthetic study rows, a small study that must degrade gracefully, and the round
trip through a real SQLite MLflow store: cell runs written, read back, fitted by
`memlayers fit --study`, laws.json logged to the study's parent run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memlayers.platform.cli.main import main

REF = {"A": 60.0, "E": 1.8, "alpha": 0.11}
BASES = {"tiny": 1e15, "small": 4e15, "medium": 1.6e16, "large": 6.4e16}
SLOTS = (4096, 16384, 65536, 262144)


def dense_loss(c):
    return REF["E"] + REF["A"] * c ** -REF["alpha"]


def study_rows(rng=None) -> list[dict]:
    """dense and moe at four bases, memory_plus at four bases x four memory sizes, two pkm runs."""
    rng = rng or np.random.default_rng(0)
    jitter = lambda: float(np.exp(rng.normal(0, 0.001)))  # noqa: E731
    rows = []

    def add(family, base, c, loss, slots=0, experts=0, recall=None):
        rows.append({"run_id": f"{family}-{base}-{slots or experts}", "cell": f"{family}/{base}/{slots}",
                     "study": "toy", "family": family, "base": base, "memory_slots": slots, "experts": experts,
                     "train_flops": c, "total_params": 1e6, "active_params": 1e6, "val_loss": loss,
                     "qa_exact_match": recall, "qa_answer_nll": None if recall is None else 3.0 * (1.2 - recall)})

    for base, c in BASES.items():
        add("dense", base, c, dense_loss(c) * jitter(), recall=0.3)
        add("moe", base, c, dense_loss(1.5 * c) * jitter(), experts=8)
        for m in SLOTS:  # memory worth 3x dense compute at 65k slots, more with more slots
            k = 3.0 * (m / 65536) ** 0.3
            recall = 0.3 + 0.6 / (1 + np.exp(-1.2 * (np.log(m) - np.log(30000))))
            add("memory_plus", base, c * (1.0 + 0.01 * np.log2(m)), dense_loss(k * c) * jitter(), slots=m,
                recall=float(recall))
    add("pkm", "tiny", BASES["tiny"], dense_loss(2 * BASES["tiny"]), slots=65536)
    add("pkm", "small", BASES["small"], dense_loss(2 * BASES["small"]), slots=65536)
    return rows


def test_fit_study_fits_every_law():
    from memlayers.platform.laws.study import fit_study

    result = fit_study(study_rows(), bootstrap=30, seed=0)
    laws = result["compute_laws"]
    assert laws["dense"]["params"]["alpha"] == pytest.approx(REF["alpha"], rel=0.2)
    assert "memory_plus[slots=65536]" in laws and "params" in laws["memory_plus[slots=65536]"]
    assert "skipped" in laws["pkm"] and "need at least 3" in laws["pkm"]["skipped"]

    vs_dense = result["multipliers"]["vs_dense"]
    runs = {r["label"]: r for r in vs_dense["memory_plus"]["runs"]}
    assert runs["memory_plus-medium-65536"]["multiplier"] == pytest.approx(3.0 / (1 + 0.16), rel=0.3)
    assert vs_dense["moe"]["k"] == pytest.approx(1.5, rel=0.3)
    assert vs_dense["moe"]["k_interval"][0] < vs_dense["moe"]["k"] < vs_dense["moe"]["k_interval"][1]
    assert vs_dense["pkm"]["k"] == pytest.approx(2.0, rel=0.3)  # the constant needs no law of its own
    assert "memory_plus" in result["multipliers"]["vs_moe"] and "dense" in result["multipliers"]["vs_moe"]
    assert result["multipliers"]["vs_moe"]["dense"]["k"] < 1  # dense needs more compute than moe

    memory = result["memory_laws"]["medium/memory_plus"]
    assert memory["val_loss"]["params"]["gamma"] > 0 and memory["val_loss"]["law"] == "memory"
    assert memory["qa_exact_match"]["law"] == "recall"
    assert memory["qa_exact_match"]["params"]["floor"] == pytest.approx(0.3, abs=0.05)
    assert "params" in memory["qa_answer_nll"]
    assert "skipped" in result["memory_laws"]["tiny/pkm"]["val_loss"]
    assert any("pkm" in reason for reason in result["skipped"])
    json.dumps(result, allow_nan=True)  # plain data


def test_small_study_degrades_gracefully():
    from memlayers.platform.laws.study import fit_study

    rows = [r for r in study_rows() if r["base"] in ("tiny", "small") and r["memory_slots"] in (0, 4096)]
    rows[0]["val_loss"] = None  # a run without its final metric
    result = fit_study(rows)
    assert "skipped" in result["compute_laws"]["dense"]
    assert "skipped" in result["multipliers"]["vs_dense"] and "skipped" in result["multipliers"]["vs_moe"]
    assert result["n_runs"] == len(rows) and len(result["skipped"]) >= 4
    assert fit_study([])["compute_laws"] == {}


@pytest.fixture(scope="module")
def mlflow_study(tmp_path_factory):
    """A real SQLite MLflow store holding the study's parent run and cell runs."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("toy", artifact_location=(root / "mlartifacts").as_uri())
    parent = client.create_run(exp_id, tags={"memlayers.role": "study", "study": "toy"}).info.run_id
    rows = study_rows()
    for row in rows:
        tags = {"memlayers.role": "cell", "mlflow.parentRunId": parent}
        tags.update({k: str(row[k]) for k in ("study", "cell", "family", "base", "memory_slots", "experts",
                                              "train_flops", "total_params", "active_params")})
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        for metric in ("val_loss", "qa_exact_match", "qa_answer_nll"):
            if row[metric] is not None:
                client.log_metric(run_id, metric, row[metric])
        client.set_terminated(run_id, "FINISHED")
    failed = client.create_run(exp_id, tags={"memlayers.role": "cell", "family": "dense", "train_flops": "1e17"})
    client.log_metric(failed.info.run_id, "val_loss", 0.1)
    client.set_terminated(failed.info.run_id, "FAILED")
    client.set_terminated(parent, "FINISHED")
    tiny = client.create_experiment("tiny", artifact_location=(root / "tiny-artifacts").as_uri())
    for c in (1e15, 4e15):  # a study too small for any law, and without a parent run
        run_id = client.create_run(tiny, tags={"memlayers.role": "cell", "family": "dense", "base": "b",
                                               "train_flops": str(c)}).info.run_id
        client.log_metric(run_id, "val_loss", float(dense_loss(c)))
        client.set_terminated(run_id, "FINISHED")
    study_file = root / "toy.yaml"
    study_file.write_text(f"name: toy\nworkdir: {root / 'work'}\ntracking:\n  uri: {uri}\nfit:\n  bootstrap: 0\n")
    return {"uri": uri, "parent": parent, "rows": rows, "file": study_file, "root": root}


def test_load_study_rows_reads_finished_cells(mlflow_study):
    from memlayers.platform.tracking.runs import load_study_rows, parent_run_id

    rows = load_study_rows("toy", mlflow_study["uri"])
    assert len(rows) == len(mlflow_study["rows"])  # the FAILED run is left out
    by_cell = {r["cell"]: r for r in rows}
    for expected in mlflow_study["rows"]:
        got = by_cell[expected["cell"]]
        assert got["family"] == expected["family"] and got["memory_slots"] == expected["memory_slots"]
        assert got["train_flops"] == pytest.approx(expected["train_flops"])
        assert got["val_loss"] == pytest.approx(expected["val_loss"])
        assert (got["qa_exact_match"] is None) == (expected["qa_exact_match"] is None)
    assert parent_run_id("toy", mlflow_study["uri"]) == mlflow_study["parent"]
    with pytest.raises(ValueError, match="no MLflow experiment"):
        load_study_rows("absent", mlflow_study["uri"])


def test_load_study_rows_keeps_the_cells_of_the_current_definition(mlflow_study, tmp_path):
    """A study whose file changed keeps its earlier cells' runs in its experiment: with the
    recorded cells.json (what `study run` writes) only the current cells are read."""
    import json

    from memlayers.platform.study.record import StudyRecord
    from memlayers.platform.tracking.conventions import CELLS_FILE
    from memlayers.platform.tracking.runs import load_study_rows
    from memlayers.platform.tracking.study_ref import StudyRef

    every = load_study_rows("toy", mlflow_study["uri"])
    current = sorted(r["cell"] for r in every)[: len(every) // 2]
    (tmp_path / CELLS_FILE).write_text(json.dumps([{"id": cell, "name": cell} for cell in current]))
    kept = StudyRecord.of_ref(StudyRef("toy", tmp_path, mlflow_study["uri"])).rows()
    assert sorted(r["cell"] for r in kept) == current and 0 < len(kept) < len(every)
    unknown = StudyRecord.of_ref(StudyRef("toy", tmp_path / "no-definition", mlflow_study["uri"]))
    assert len(unknown.rows()) == len(every)


def test_fit_study_cli_writes_laws_and_logs_them_to_the_parent_run(mlflow_study, capsys):
    from mlflow.tracking import MlflowClient

    code = main(["fit", "--study", str(mlflow_study["file"]), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    path = mlflow_study["root"] / "work" / "laws" / "laws.json"
    assert json.loads(path.read_text())["input_sha256"] == result["input_sha256"]
    assert result["provenance"]["study"] == "toy" and result["provenance"]["parent_run_id"] == mlflow_study["parent"]
    assert result["n_runs"] == len(mlflow_study["rows"]) and "params" in result["compute_laws"]["dense"]
    client = MlflowClient(tracking_uri=mlflow_study["uri"])
    logged = [a.path for a in client.list_artifacts(mlflow_study["parent"], "laws")]
    assert logged == ["laws/laws.json"]

    out = mlflow_study["root"] / "by-name"
    code = main(["fit", "--study", "tiny", "--tracking-uri", mlflow_study["uri"], "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "study tiny: 2 finished runs" in captured.out and "skipped" in captured.out
    assert "not logged" in captured.err  # no parent run: said, not fatal
    tiny = json.loads((out / "laws.json").read_text())
    assert "skipped" in tiny["compute_laws"]["dense"] and tiny["provenance"]["parent_run_id"] is None
    assert main(["fit", "--study", "nothing", "--tracking-uri", mlflow_study["uri"], "--out", str(out)]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err
