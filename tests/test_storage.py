"""Storage URIs, the `storage:` field, artifact locations and what `study submit` ships (no cluster)."""

import yaml
from conftest import REPO_ROOT

from memlayers.config_schema import ConfigError
from memlayers.platform.cluster import storage
from memlayers.platform.study.schema import StudyError
from memlayers.platform.study.submit import job_command, job_env, last_error_line
from memlayers.platform.study.validate import load_study, with_overrides
from memlayers.platform.tracking.conventions import artifact_location
from memlayers.platform.tracking.study_ref import default_workdir
from memlayers.platform.train.run_config import run_config_from_dict

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"


def test_storage_uris_join_and_local_paths(tmp_path):
    assert storage.join("s3://bucket/prefix/", "smoke", "laws/laws.json") == "s3://bucket/prefix/smoke/laws/laws.json"
    assert storage.study_root(str(tmp_path), "smoke") == str(tmp_path / "smoke")
    assert storage.local_path(f"file://{tmp_path}") == tmp_path
    assert storage.local_path("gs://b/x") is None and not storage.is_local("s3://b")
    assert storage.uri_problem("s3://bucket/x") is None and storage.uri_problem("/shared/runs") is None
    assert "unknown scheme" in storage.uri_problem("ftp://host/x")
    assert "no bucket" in storage.uri_problem("s3://")


def test_local_storage_round_trip_and_publish(tmp_path):
    root = str(tmp_path / "store" / "smoke")
    storage.write_text(storage.join(root, "laws", "laws.json"), "{}")
    assert storage.read_text(storage.join(root, "laws", "laws.json")) == "{}"
    assert storage.read_text(storage.join(root, "missing.json")) is None
    workdir = tmp_path / "wd"
    (workdir / "report").mkdir(parents=True)
    (workdir / "report" / "report.html").write_text("<html>")
    assert (storage.publish(workdir / "report" / "report.html", workdir, str(workdir))
            == workdir / "report" / "report.html")
    assert (storage.publish(workdir / "report" / "report.html", workdir, root)
            == storage.join(root, "report", "report.html"))
    assert storage.list_files(root) == ["laws/laws.json", "report/report.html"]
    assert storage.download(storage.join(root, "report", "report.html"), tmp_path / "copy.html")
    assert (tmp_path / "copy.html").read_text() == "<html>"


def test_storage_field_is_validated_and_named(tmp_path):
    data = yaml.safe_load(SMOKE.read_text())
    data["storage"] = "ftp://host/x"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_study(path)
        raise AssertionError("expected a StudyError")
    except StudyError as error:
        assert [e.path for e in error.errors] == ["storage"]
    study = load_study(SMOKE)
    assert study.storage_root() == str(study.workdir_path())  # without storage: today's layout
    moved = with_overrides(study, storage="s3://bucket/studies", tracking_uri="http://127.0.0.1:5000")
    assert moved.storage_root() == "s3://bucket/studies/smoke" and moved.tracking_uri() == "http://127.0.0.1:5000"
    try:
        with_overrides(study, storage="ftp://x")
        raise AssertionError("expected a StudyError")
    except StudyError as error:
        assert error.errors[0].path == "storage"
    try:
        run_config_from_dict({"train": {"steps": 1}, "storage": "ftp://x"})
        raise AssertionError("expected a ConfigError")
    except ConfigError as error:
        assert error.path == "storage"


def test_artifacts_go_through_a_server_or_to_storage():
    assert artifact_location("http://127.0.0.1:5000", "s3://b/p/smoke") is None
    assert artifact_location("sqlite:////x/mlflow.db", "s3://b/p/smoke") == "s3://b/p/smoke/mlartifacts"
    assert artifact_location("sqlite:////x/mlflow.db", "/runs/smoke") == "file:///runs/smoke/mlartifacts"


def test_submit_ships_settings_and_never_works_in_rays_session_folder(monkeypatch, tmp_path):
    command = job_command("smoke.yaml", storage="s3://b/p", tracking_uri="http://h:5000")
    assert command[-4:] == ["--storage", "s3://b/p", "--tracking-uri", "http://h:5000"]
    # only what the user named travels (see tests/test_secrets.py); credentials come from the nodes
    env = job_env({"AWS_ENDPOINT_URL": "http://s3", "AWS_SECRET_ACCESS_KEY": "k", "MLFLOW_TRACKING_TOKEN": "t",
                   "HOME": "/root"}, shipped={"AWS_ENDPOINT_URL": "http://s3"})
    assert env["AWS_ENDPOINT_URL"] == "http://s3"
    assert not {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "HOME", "HF_HUB_OFFLINE"} & set(env)
    assert env["MEMLAYERS_RUNS_ROOT"] == "~/memlayers/runs"
    assert "MEMLAYERS_RUNS_ROOT" not in job_env({}, workdir="/shared/wd")
    monkeypatch.setenv("MEMLAYERS_RUNS_ROOT", str(tmp_path / "runs"))
    assert default_workdir("smoke") == tmp_path / "runs" / "smoke"


def test_last_error_line_is_the_jobs_own():
    logs = "study smoke: 2 cells\nsmoke.yaml: tracking.uri: sqlite:///x is a file on this node ...\n\n"
    assert last_error_line(logs).startswith("smoke.yaml: tracking.uri:")
    assert last_error_line("a\nTraceback\nRuntimeError: boom\n") == "RuntimeError: boom"
    assert last_error_line("") == ""
