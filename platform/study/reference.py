"""The study-file reference (docs/study-file.md), generated from the schema's dataclasses.

Every field of a study file is a dataclass field of `schema.Study` or of a section nested in it;
its documentation is the comment on the line that declares it (or the class docstring for a
section). `render()` walks the dataclasses from `Study` down and writes one table per section:
key, type, default, meaning. `tests/test_study_reference.py` fails when the file in docs/ is not
what `render()` gives, so the reference cannot drift from the code:

    memlayers study reference --write docs/study-file.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

from memlayers.platform.study.schema import Study

INTERNAL = {"file"}  # Study fields set by the reader, not written in a study file
HEADER = """# Study file reference

Generated from the schema (`platform/study/schema.py` and the sections it nests) by
`memlayers study reference --write docs/study-file.md`; a test fails when it is stale. A wrong
field is refused by `memlayers study validate` with exit 2 and one line naming it.
"""


def field_comments(cls: type) -> dict[str, str]:
    """The trailing comment of each field declaration in `cls`'s source (continued comment lines joined)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    source_lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = source_lines[node.end_lineno - 1]
            match = re.search(r"#\s?(.*)$", text)
            parts = [match.group(1).strip()] if match else []
            following = node.end_lineno
            while parts and following < len(source_lines) and source_lines[following].strip().startswith("#"):
                parts.append(source_lines[following].strip().lstrip("#").strip())
                following += 1
            comments[node.target.id] = " ".join(parts)
    return comments


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return "null" if value is None else f"`{value!r}`"


def _nested(hint: Any) -> list[type]:
    """The dataclasses a field's type holds (itself, or inside Optional/list/dict)."""
    if dataclasses.is_dataclass(hint):
        return [hint]
    return [c for a in typing.get_args(hint) for c in _nested(a)]


def _sections(root: type, key: str) -> list[tuple[str, type]]:
    """(dotted key, dataclass) for `root` and every section below it, depth first, each once."""
    out, seen = [], set()

    def walk(cls: type, path: str) -> None:
        if cls in seen:
            return
        seen.add(cls)
        out.append((path, cls))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for child in _nested(hints[f.name]):
                suffix = "[]" if typing.get_origin(hints[f.name]) is list else ""
                suffix = ".<name>" if typing.get_origin(hints[f.name]) is dict else suffix
                walk(child, f"{path}.{f.name}{suffix}" if path else f.name + suffix)

    walk(root, key)
    return out


def render() -> str:
    """The whole reference as Markdown."""
    parts = [HEADER]
    for path, cls in _sections(Study, ""):
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        title = f"`{path}`" if path else "Top level"
        doc = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        parts.append(f"## {title}\n")
        if doc:
            parts.append(doc.splitlines()[0] + "\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        for f in dataclasses.fields(cls):
            if cls is Study and f.name in INTERNAL:
                continue
            meaning = comments.get(f.name, "").replace("|", "\\|")
            type_name = _type_name(hints[f.name]).replace("|", "\\|")
            parts.append(f"| `{f.name}` | {type_name} | {_default(f)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)


def write(path: Path) -> None:
    path.write_text(render())
