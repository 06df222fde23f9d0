"""The study record: one fit for the controller, `memlayers fit --study` and the report (claims kept,
current cells only, duplicates fitted once), whole-file writes, and checkpoints in a bucket evaluable.

The stores are real: SQLite MLflow stores, a moto S3 server on 127.0.0.1 (tests/two_nodes.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from memlayers.platform.cli.main import main
from memlayers.platform.study.cells import expand
from memlayers.platform.study.record import LAWS_FILE, RecordError, StudyRecord, fit_and_record
from memlayers.platform.study.validate import load_study
from memlayers.platform.tracking import client as tracking
from memlayers.platform.tracking.study_ref import StudyRef

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"
CLAIM = {"id": "memory_beats_dense", "claim": "Memory+ reaches a lower validation loss than dense",
         "metric": "val_loss", "subject": {"family": "memory_plus"}, "reference": {"family": "dense"}}
LOSS = {"dense": 2.5, "memory_plus": 2.0}


def _study_file(path: Path, workdir: Path, seeds: list[int]) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data.update(name="rec", workdir=str(workdir), seeds=seeds, fit={"bootstrap": 0, "claims": [CLAIM]})
    path.write_text(yaml.safe_dump(data))
    return path


def _log_cell(uri: str, experiment: str, parent: str, cell, val_loss: float) -> str:
    tags = {"memlayers.role": "cell", "study": "rec", "cell": cell.id, "family": cell.family, "base": cell.base,
            "memory_slots": str(cell.memory_slots or 0), "experts": "0", "seed": str(cell.seed),
            "train_flops": "1e12"}
    run_id = tracking.create_run(uri, experiment, cell.name, tags, parent)
    tracking.log_metrics(uri, run_id, {"val_loss": val_loss, "loss": val_loss})
    tracking.set_status(uri, run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A study of two seeds whose cells all finished, one of them twice (two controllers before the lock)."""
    root = tmp_path_factory.mktemp("record")
    path = _study_file(root / "rec.yaml", root / "wd", seeds=[0, 1])
    study = load_study(path)
    uri = study.tracking_uri()
    experiment = tracking.ensure_experiment(uri, "rec", root / "wd" / "mlartifacts")
    parent = tracking.create_run(uri, experiment, "rec", {"memlayers.role": "study", "study": "rec"})
    cells = expand(study, account_budgets=False)
    runs = {cell.id: _log_cell(uri, experiment, parent, cell, LOSS[cell.family] + 0.1 * cell.seed) for cell in cells}
    twice = cells[0]
    runs[twice.id] = _log_cell(uri, experiment, parent, twice, LOSS[twice.family] + 0.05)
    return path, study, cells, runs, twice


def test_fit_then_report_keep_the_claims_and_a_changed_study_shows_only_its_current_cells(recorded, tmp_path,
                                                                                          capsys):
    from memlayers.dashboards.report import write_report
    from memlayers.dashboards.study_data import load_study as load_report_data

    path, study, cells, runs, twice = recorded
    assert main(["fit", "--study", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "memory_beats_dense: HOLDS" in printed and f"cell {twice.id}: 2 FINISHED runs" in printed
    laws = json.loads((study.workdir_path() / LAWS_FILE).read_text())
    assert [c["id"] for c in laws["claims"]] == ["memory_beats_dense"] and laws["claims"][0]["holds"]
    assert laws["n_runs"] == len(cells)  # the cell that finished twice is fitted once, on its newer run

    assert main(["report", str(path), "--no-log"]) == 0
    page = (study.workdir_path() / "report" / "report.html").read_text()
    assert "memory_beats_dense" in page and "HOLDS" in page and "no claims checked" not in page
    assert json.loads((study.workdir_path() / LAWS_FILE).read_text())["claims"] == laws["claims"]  # not refitted

    # the file changes: seed 1 is dropped; its runs stay in the experiment but are no longer the study's
    changed = _study_file(path, study.workdir_path(), seeds=[0])
    current = {c.id for c in expand(load_study(changed), account_budgets=False)}
    ref = StudyRef("rec", study.workdir_path(), study.tracking_uri(), changed)
    shown = load_report_data(ref, with_histories=False)
    assert {c.cell_id for c in shown.cells} == current and len(current) == 2
    assert {c.run_id for c in shown.cells} == {runs[c] for c in current}
    write_report(ref, log_artifacts=False)
    page = (study.workdir_path() / "report" / "report.html").read_text()
    gone = [c.name for c in cells if c.id not in current]
    assert gone and not any(name in page for name in gone)
    refitted = json.loads((study.workdir_path() / LAWS_FILE).read_text())
    assert refitted["n_runs"] == 2 and refitted["claims"][0]["seeds"] == [0]


def test_a_failed_fit_prints_no_verdict_and_a_truncated_laws_file_is_one_line(recorded, tmp_path):
    from memlayers.platform.study.controller import fit_laws
    from memlayers.platform.study.record import print_claims

    path, study, *_ = recorded
    record = StudyRecord.of_study(study)
    record.workdir = record.local("elsewhere")  # a record of its own; the other test's files stay as they are
    record.root = str(record.workdir)
    fitted = fit_and_record(record)
    assert fitted.laws["claims"][0]["holds"]
    lost = StudyRecord.of_study(study)
    lost.workdir, lost.root = record.workdir, record.root
    lost.tracking_uri = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}"  # the store is gone: the fit fails
    lines: list[str] = []
    print_claims(fit_laws(lost, lines.append), lines.append)
    assert "claims: not checked (no laws were fitted)" in lines
    assert not any("memory_beats_dense" in line for line in lines)  # the earlier file's verdict is not shown

    laws = record.local(LAWS_FILE)
    laws.write_text(laws.read_text()[:40])
    with pytest.raises(RecordError) as error:
        record.read_json(LAWS_FILE)
    assert str(error.value).count("\n") == 0 and str(laws) in str(error.value)
    assert not list(laws.parent.glob(".*.tmp"))  # whole-file writes leave no temporary behind


def test_checkpoints_in_a_bucket_resolve_load_and_are_all_evaluated(recorded, tmp_path, monkeypatch):
    """Study cells whose checkpoint tag is an s3:// URI (moto on 127.0.0.1): every finished cell is a
    target whose checkpoint downloads and loads."""
    from two_nodes import BUCKET, Cluster, can_build, start_moto

    from memlayers.platform.cluster import storage
    from memlayers.platform.data.prepare import prepare_data
    from memlayers.platform.eval.loading import load_trained
    from memlayers.platform.eval.stage import check_targets, pending
    from memlayers.platform.eval.targets import study_targets
    from memlayers.platform.train.loop import RunLoop
    from memlayers.platform.train.run_config import run_config_from_dict

    if "moto_server" in (can_build() or ""):
        pytest.skip(can_build())
    cluster = Cluster(root=tmp_path, env=dict(os.environ))
    try:
        start_moto(cluster)
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, cluster.env[key])
        cfg = run_config_from_dict({
            "name": "s3eval", "model": {"base": "nano", "family": "dense"},
            "data": {"source": "facts", "tokenizer": "word", "seq_len": 32,
                     "facts": {"people": 60, "values_per_attribute": 8, "renderings": 4}},
            "train": {"steps": 2, "batch_size": 4, "qa_eval_items": 8, "eval_batches": 1}})
        RunLoop(cfg, prepare_data(cfg.data, tmp_path / "cache")).save(tmp_path / "checkpoint")
        data = yaml.safe_load(SMOKE.read_text())
        data.update(name="s3rec", workdir=str(tmp_path / "wd"), storage=f"s3://{BUCKET}/studies")
        data["tracking"]["uri"] = recorded[1].tracking_uri()  # the other tests' store: one store created, not two
        path = tmp_path / "s3rec.yaml"
        path.write_text(yaml.safe_dump(data))
        study = load_study(path)
        record = StudyRecord.of_study(study)
        uri = study.tracking_uri()
        experiment = tracking.ensure_experiment(uri, "s3rec", tmp_path / "mlartifacts")
        locations = []
        for cell in expand(study, account_budgets=False):
            location = storage.join(record.checkpoints(), cell.name, "checkpoint_00000001")
            for file in (tmp_path / "checkpoint").rglob("*"):
                if file.is_file():
                    storage.upload(file, storage.join(location, *file.relative_to(tmp_path / "checkpoint").parts))
            run_id = tracking.create_run(uri, experiment, cell.name, {"memlayers.role": "cell", "study": "s3rec",
                                                                      "cell": cell.id, "checkpoint": location})
            tracking.set_status(uri, run_id, "FINISHED")
            locations.append(location)
        fs, inside = storage.open_fs(locations[0])  # what Ray's Checkpoint gives a multi-worker cell
        assert storage.location_of(fs, inside) == locations[0]  # the run's tag keeps the scheme (train/launcher.py)
        targets = study_targets(str(path))
        assert sorted(t.location for t in targets) == sorted(locations) and locations[0].startswith("s3://")
        assert pending(targets, ["facts_qa"]) == targets  # every finished cell is to be evaluated
        check_targets(targets, ["facts_qa"])  # the stage's own check: each checkpoint downloads and reads
        for target in targets:
            assert load_trained(target.checkpoint).step == 0
    finally:
        cluster.stop_all()
