"""The study-file reference in docs/ is what the schema renders today, and every field of the study's own
sections says what it means.

When this fails after a schema change, regenerate: `memlayers study reference --write docs/study-file.md`.
"""

from __future__ import annotations

import dataclasses

from conftest import REPO_ROOT

from memlayers.platform.cli.main import main
from memlayers.platform.study.reference import _sections, field_comments, render
from memlayers.platform.study.schema import Study

REFERENCE = REPO_ROOT / "docs" / "study-file.md"
# The modules whose sections the reference documents field by field; each field's meaning is its comment.
DOCUMENTED_MODULES = ("memlayers.platform.study.schema", "memlayers.platform.train.run_config",
                      "memlayers.platform.data.config")


def test_docs_study_file_is_the_rendered_schema():
    assert REFERENCE.is_file(), "run: memlayers study reference --write docs/study-file.md"
    assert REFERENCE.read_text() == render(), "stale: run memlayers study reference --write docs/study-file.md"


def test_cli_prints_and_writes_the_reference(tmp_path, capsys):
    assert main(["study", "reference"]) == 0
    assert capsys.readouterr().out == render()
    target = tmp_path / "study-file.md"
    assert main(["study", "reference", "--write", str(target)]) == 0
    assert target.read_text() == render()


def test_every_field_of_the_study_sections_has_a_meaning():
    missing = []
    for path, cls in _sections(Study, ""):
        if cls.__module__ not in DOCUMENTED_MODULES:
            continue
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name != "file" and not comments.get(f.name):
                missing.append(f"{path or '(top)'}.{f.name} ({cls.__module__})")
    assert not missing, "fields without a trailing comment: " + ", ".join(missing)


def test_every_section_is_a_table_with_its_fields():
    text = render()
    for path, cls in _sections(Study, ""):
        title = f"## `{path}`" if path else "## Top level"
        assert title in text, title
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(cls):
            if f.name != "file":
                assert f"| `{f.name}` |" in section, f"{path}.{f.name}"
