"""Secrets stay out of jobs and records: secret-looking variables are shipped only when named with
--ship-secret, and URIs that carry credentials are refused where they enter (exit 2, one line naming the
field), before anything starts. The end-to-end check (a canary secret submitted to a real Ray head) is
in tests/test_study_submit.py."""

import pytest
from conftest import REPO_ROOT

from memlayers.platform.cli.main import main
from memlayers.platform.cluster.secrets import (
    ShipRefused,
    credential_problems,
    looks_secret,
    shipped_env,
    uri_credentials_problem,
)

SMOKE = str(REPO_ROOT / "studies" / "smoke.yaml")


def test_secret_looking_names():
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "OPENAI_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
                 "DB_PASS", "github_token"):
        assert looks_secret(name), name
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_USERNAME", "HF_HUB_OFFLINE", "PWD",
                 "KEYBOARD_LAYOUT", "AWS_SHARED_CREDENTIALS_FILE", "RAY_AUTH_TOKEN_PATH", "MONKEY"):
        assert not looks_secret(name), name


def test_credentials_in_uris():
    for uri, secret in (("https://user:tok1@mlflow.example.com", "tok1"), ("https://tok2@host:5000", "tok2"),
                        ("s3://AKIA:S3CR3T@bucket/p", "S3CR3T"), ("http://host:5000/?token=tok3", "tok3"),
                        ("https://h/x?X-Amz-Signature=sig4", "sig4")):
        problem = uri_credentials_problem(uri)
        assert problem and "credentials" in problem, uri
        assert secret not in problem, problem  # the refusal itself is printed: it must not repeat the secret
    for uri in ("s3://bucket/prefix", "http://127.0.0.1:5000", "/shared/runs", "sqlite:////x/mlflow.db",
                "https://host/path?page=2", None, "user@host:path"):
        assert uri_credentials_problem(uri) is None, uri
    assert credential_problems({"storage": "s3://K:S@b/p", "tracking.uri": None}) == [
        ("storage", uri_credentials_problem("s3://K:S@b/p"))]


def test_shipping_names_what_travels():
    environ = {"AWS_ENDPOINT_URL": "http://s3:9000", "AWS_SECRET_ACCESS_KEY": "canary", "BAD": "https://u:p@h"}
    assert shipped_env(environ, ["AWS_ENDPOINT_URL"], []) == {"AWS_ENDPOINT_URL": "http://s3:9000"}
    assert shipped_env(environ, [], ["AWS_SECRET_ACCESS_KEY"]) == {"AWS_SECRET_ACCESS_KEY": "canary"}
    with pytest.raises(ShipRefused, match="--ship-secret AWS_SECRET_ACCESS_KEY") as refused:
        shipped_env(environ, ["AWS_SECRET_ACCESS_KEY"], [])
    assert "canary" not in str(refused.value)
    with pytest.raises(ShipRefused, match="--env MISSING: not set"):
        shipped_env(environ, ["MISSING"], [])
    with pytest.raises(ShipRefused, match="--env BAD: .*credentials"):
        shipped_env(environ, ["BAD"], [])


def test_submit_refuses_a_secret_without_the_flag_before_connecting(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-value")
    monkeypatch.chdir(tmp_path)
    # port 9 (discard) on loopback: nothing answers, so a refusal that connected first would not say this
    code = main(["study", "submit", SMOKE, "--address", "http://127.0.0.1:9", "--env", "AWS_SECRET_ACCESS_KEY"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--ship-secret AWS_SECRET_ACCESS_KEY" in err[0], err
    assert "canary-value" not in err[0] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, field", [("--storage", "s3://AKIAX:SECRETY@bucket/p", "storage"),
                                                 ("--tracking-uri", "https://me:TOKENZ@mlflow:5000", "tracking.uri")])
def test_study_run_refuses_credentials_in_uris(flag, value, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["study", "run", SMOKE, flag, value, "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f": {field}: " in err[0], err
    assert not any(secret in err[0] for secret in ("SECRETY", "TOKENZ", "AKIAX")), err
    assert list(tmp_path.iterdir()) == []  # no work directory, no MLflow store


@pytest.mark.parametrize("flag, value, field", [("--storage", "s3://AKIAX:SECRETY@bucket/p", "storage"),
                                                 ("--tracking-uri", "https://me:TOKENZ@mlflow:5000", "tracking.uri")])
def test_train_refuses_credentials_in_uris(flag, value, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = str(REPO_ROOT / "studies" / "runs" / "tiny-memory-plus.yaml")
    code = main(["train", run, flag, value, "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f": {field}: " in err[0], err
    assert not any(secret in err[0] for secret in ("SECRETY", "TOKENZ", "AKIAX")), err
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_session_folder_others_may_write(capsys, tmp_path, monkeypatch):
    import os
    import tempfile

    folder = tmp_path / f"memlayers-ray-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = str(REPO_ROOT / "studies" / "runs" / "tiny-memory-plus.yaml")
    code = main(["train", run, "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "writable by others" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
