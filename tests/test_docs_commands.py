"""The README and the guides in docs/ cannot drift from the code.

- Every `memlayers ...` command in a fenced block of README.md or docs/*.md parses with the real argument
  parser (a `bench` target with its own), so a renamed command or flag fails here; the cheap ones run for
  real and must exit 0; a repository file a command names must exist.
- Every `make` target the README names exists in the Makefile.
- The README's command table names every `memlayers` command, study action, bench target and make target.
- README.md is at most 12,288 bytes; every relative link in README.md and docs/ points to a file that exists.

docs/results/ and docs/bench/ are dated records of past runs: their commands are not checked, their links are.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from memlayers.platform.cli.bench import BENCHMARKS
from memlayers.platform.cli.main import COMMANDS, build_parser, main

README = REPO_ROOT / "README.md"
GUIDES = sorted((REPO_ROOT / "docs").glob("*.md"))
README_LIMIT = 12_288
# Commands cheap enough to run here for real (argv prefixes); every other command is parsed only.
# predict and plan read a joint law holding the synthetic forms' true parameters in place of the file named.
RUN_FOR_REAL = (("models",), ("study", "reference"), ("study", "validate", "studies/smoke.yaml"),
                ("study", "validate", "studies/paper-grid.yaml"), ("predict",), ("plan",))
REPO_PATH = re.compile(r"^(studies|docs|tests)/[\w./-]+\.\w+$")  # an argument naming a file of this repository
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def fenced_lines(text: str) -> list[str]:
    """The lines of the fenced blocks of a Markdown text, backslash continuations joined."""
    lines: list[str] = []
    for block in FENCE.findall(text):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
    return lines


def commands(text: str, program: str) -> list[list[str]]:
    """The argv (program excluded) of every fenced line that runs `program`; comments dropped."""
    found = []
    for line in fenced_lines(text):
        if line.split()[:1] == [program]:
            found.append(shlex.split(line, comments=True)[1:])
    return found


def documented() -> list[tuple[str, list[str]]]:
    """(file, argv) of every `memlayers` command in the README and the guides."""
    return [(path.relative_to(REPO_ROOT).as_posix(), argv)
            for path in [README, *GUIDES] for argv in commands(path.read_text(), "memlayers")]


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-commands by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def parse(argv: list[str]) -> None:
    """Parse like `memlayers` does (a bench target's options with its own parser); SystemExit on a bad word."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        build_parser(BENCHMARKS, "memlayers bench").parse_args([args.name, *args.rest])


def test_docs_have_commands():
    found = documented()
    assert any(file == "README.md" for file, _ in found), "the README lists no memlayers command"
    assert any(file != "README.md" for file, _ in found), "the guides list no memlayers command"


@pytest.mark.parametrize("file, argv", documented(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_command_parses_and_names_existing_files(file, argv, capsys):
    try:
        parse(argv)
    except SystemExit as stop:
        assert stop.code == 0, f"{file}: memlayers {' '.join(argv)}: {capsys.readouterr().err.strip()}"
    missing = [word for word in argv if REPO_PATH.match(word) and not (REPO_ROOT / word).exists()]
    assert not missing, f"{file}: memlayers {' '.join(argv)}: no such file {missing}"


def _true_joint_law(path: Path) -> Path:
    """A joint.json of the synthetic forms' true parameters (what `memlayers fit --law joint` writes)."""
    from memlayers.platform.laws.joint import KIND, VERSION
    from memlayers.platform.laws.joint_synthetic import TRUTH, reference_sizes

    m_ref, n_ref = reference_sizes()
    forms = {name: {"form": name, "params": dict(params)} for name, params in TRUTH.items()}
    path.write_text(json.dumps({"kind": KIND, "version": VERSION, "forms": forms, "chosen": "effective_params",
                                "m_ref": m_ref, "n_ref": n_ref, "moe": {"skipped": "none"}}))
    return path


def test_cheap_documented_commands_run(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    law = _true_joint_law(tmp_path / "joint.json")
    ran = set()
    for file, argv in documented():
        prefix = next((p for p in RUN_FOR_REAL if tuple(argv[:len(p)]) == p), None)
        if prefix is None or "--write" in argv or tuple(argv) in ran:
            continue
        ran.add(tuple(argv))
        if "--law" in argv:
            argv = [str(law) if i and argv[i - 1] == "--law" else word for i, word in enumerate(argv)]
        code = main(argv)
        assert code == 0, f"{file}: memlayers {' '.join(argv)} exited {code}: {capsys.readouterr().err.strip()}"
    assert ran, "no cheap command in the docs: the run-for-real list no longer matches them"


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (REPO_ROOT / "Makefile").read_text(), re.M))


def test_make_targets_in_readme_exist():
    named = [argv[0] for argv in commands(README.read_text(), "make") if argv]
    assert named, "the README names no make target"
    assert set(named) <= _make_targets(), f"not in the Makefile: {sorted(set(named) - _make_targets())}"


def test_readme_command_table_is_complete():
    """A command, its actions (study, data), a bench target or a make target added without a README line fails."""
    lines = commands(README.read_text(), "memlayers")
    named = {argv[0] for argv in lines if argv}
    assert set(COMMANDS) <= named, f"README lacks memlayers {sorted(set(COMMANDS) - named)}"
    for command, sub in _choices(build_parser()).items():
        actions = set(_choices(sub))
        shown = {argv[1] for argv in lines if len(argv) > 1 and argv[0] == command}
        assert actions <= shown, f"README lacks memlayers {command} {sorted(actions - shown)}"
    bench = {argv[1] for argv in lines if len(argv) > 1 and argv[0] == "bench"}
    assert set(BENCHMARKS) <= bench, f"README lacks memlayers bench {sorted(set(BENCHMARKS) - bench)}"
    phony = re.search(r"^\.PHONY:(.*)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1).split()
    made = {argv[0] for argv in commands(README.read_text(), "make") if argv}
    assert set(phony) <= made, f"README lacks make {sorted(set(phony) - made)}"


def test_readme_fits_in_12_kib():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail into docs/"


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [target for target in LINK.findall(text) if not re.match(r"^([a-z][\w+.-]*:|#)", target)]


@pytest.mark.parametrize("path", [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_point_to_files(path):
    broken = [t for t in _links(path) if not (path.parent / t.split("#", 1)[0]).exists()]
    assert not broken, f"{path.relative_to(REPO_ROOT)}: links to missing files {broken}"


def test_extraction_reads_continuations_and_comments():
    text = "x\n```\nmemlayers fit --csv a.csv \\\n    --json   # a comment\nmake demo\n```\nmemlayers not-fenced\n"
    assert commands(text, "memlayers") == [["fit", "--csv", "a.csv", "--json"]]
    assert commands(text, "make") == [["demo"]]
    with pytest.raises(SystemExit):
        parse(["fit", "--no-such-flag"])
