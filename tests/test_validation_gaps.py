"""Input that used to pass validation or end in a traceback: a YAML alias bomb in a study's claims,
`--set` onto a value that is not a section, a run named `..`, seeds past 64 bits from the command
line. Each is one line naming the file or field, exit 2, and nothing started: no run folder, no
MLflow store, no Ray session (the study file's own fields are in test_study_schema's MALFORMED)."""

import time

import pytest
import yaml
from test_study_schema import BASE

from memlayers.platform.cli.main import main


def _bomb(levels: int = 9) -> str:
    """A claim whose sentence is `levels` nested lists of ten aliases each: 10**levels values."""
    lists = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    lists += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return ("fit:\n  claims:\n    - id: laughs\n      metric: val_loss\n      subject: {family: dense}\n"
            f"      reference: {{family: dense}}\n      claim: [{', '.join(lists)}]\n")


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty current folder (and TMPDIR): whatever a command leaves behind shows up in it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and not captured.out, (captured.out, lines)
    return lines[0]


@pytest.mark.parametrize("action", ["validate", "run"])
def test_an_alias_bomb_in_the_claims_is_refused_at_once_naming_the_file(work, capsys, action):
    path = work / "bomb.yaml"
    path.write_text(yaml.safe_dump(BASE) + _bomb())
    started = time.perf_counter()
    assert main(["study", action, str(path)]) == 2
    elapsed = time.perf_counter() - started
    line = _one_line(capsys)
    assert line.startswith(f"{path}:") and "aliases expand this value to more than 100000 values" in line, line
    assert elapsed < 0.5, elapsed
    assert [p.name for p in work.iterdir()] == ["bomb.yaml"]


def test_a_recursive_alias_is_refused(work, capsys):
    path = work / "loop.yaml"
    path.write_text(yaml.safe_dump(BASE) + "description: &d [*d]\n")
    assert main(["study", "validate", str(path)]) == 2
    assert "recursive alias" in _one_line(capsys)


def test_small_aliases_still_read(work, capsys):
    path = work / "anchors.yaml"
    text = yaml.safe_dump({k: v for k, v in BASE.items() if k not in ("train", "resources")})
    path.write_text(text + "train: &t {batch_size: 4}\nresources: {workers: 1, cpus_per_worker: 1}\n"
                    "fit: {enabled: false, laws: &laws [compute, memory]}\n")
    assert main(["study", "validate", str(path)]) == 0
    assert "study tiny: valid" in capsys.readouterr().out


@pytest.mark.parametrize("sets, words", [
    (["train=5", "train.steps=3"], "--set train.steps: train is 5, not a section with keys"),
    (["train.steps"], "--set train.steps: expected KEY=VALUE"),
    (["train..steps=3"], "--set train..steps=3: expected KEY=VALUE"),
    (["name=.."], "name: must be one folder name"),
    (["name=" + "r" * 300], "name: at most 100 characters, got 300"),
    (["train.seed=1180591620717411303424"], "train.seed: must be in [0, 2^63 - 1]"),
])
def test_a_run_override_that_cannot_apply_names_its_key(work, capsys, sets, words):
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "gaps", "train": {"steps": 2, "batch_size": 2}}))
    assert main(["train", str(path), *[arg for item in sets for arg in ("--set", item)]]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"memlayers train: {path}: ") and words in line, line
    assert [p.name for p in work.iterdir()] == ["run.yaml"]


def test_seeds_past_64_bits_on_the_command_line_are_refused(work, capsys):
    path = work / "tiny.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["study", "run", str(path), "--seeds", f"1,{2**70}"]) == 2
    assert _one_line(capsys) == f"{path}: seeds[1]: (--seeds) expected an integer in [0, 2^63 - 1], got {2**70}"
    assert [p.name for p in work.iterdir()] == ["tiny.yaml"]
