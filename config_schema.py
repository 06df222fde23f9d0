"""Config files into dataclasses: the one YAML reader, and dicts -> dataclasses with field-named errors.

`read_yaml(path)` is how every config file (study, run config, study reference) is read: safe
loading, numbers like `1e12` read as numbers (YAML 1.2), duplicate keys refused; problems raise
`ConfigError("FILE:LINE:COL", ...)`; a document whose aliases expand it beyond `MAX_YAML_NODES`
values (a "billion laughs") is refused while it is read, before anything walks the expansion.
`name_problem(name)` is the one rule for names that become folder names (studies, runs).
`from_dict(Cls, data, path)` builds a (possibly nested)
dataclass from a mapping: unknown keys, wrong types and failed `validate()` checks raise
`ConfigError("model.dim: ...")`. Dataclasses may define `validate(self, path) -> None`.
It sits at the package root so that models/, platform/ and dashboards/ all use it without
depending on one another.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the dotted path of the field."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# Config files are hand-written and small; aliases that expand a document past this many values can
# only be an accident or an attack, and every later walk of the data (validation, fitting, logging)
# would pay for the expansion.
MAX_YAML_NODES = 100_000
# Names become folder names, MLflow experiment and run names: one path component, portable, short
# enough that the folders built from them stay within file-system limits.
MAX_NAME_LEN = 100
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def name_problem(name: Any) -> str | None:
    """Why `name` cannot name a study or run (a folder of its own), or None when it can."""
    if not isinstance(name, str) or not name:
        return f"expected a name of letters, digits, '_', '.', '-', got {name!r}"
    if len(name) > MAX_NAME_LEN:
        return f"at most {MAX_NAME_LEN} characters, got {len(name)}"
    if not _NAME_RE.fullmatch(name):
        return (f"must be one folder name: letters, digits, '_', '.', '-', starting with a letter or digit, "
                f"got {name!r}")
    return None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (memoised: shared nodes are
    counted per use without being walked again); refuses recursive and over-large expansions."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.composer.ComposerError(None, None, "recursive alias (a value that contains itself)",
                                          node.start_mark)
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    if size > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(None, None, f"aliases expand this value to more than {MAX_YAML_NODES} "
                                                      "values", node.start_mark)
    sizes[key] = size
    return size


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e12 as a number (YAML 1.2), refuses duplicate keys and alias bombs."""

    def compose_document(self):  # noqa: D401 - PyYAML hook
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):  # noqa: D401 - PyYAML hook
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, where: str = "yaml") -> Any:
    """Parse YAML text safely (see `read_yaml`); errors name `where` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(where, "invalid YAML: nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(place, f"invalid YAML: {problem}") from None


def read_yaml(path: str | Path) -> Any:
    """Read a config file: safe loading, `1e12` as a number, duplicate keys refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), f"cannot read: {error}") from None
    return parse_yaml(text, str(path))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path)
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as error:
                errors.append(error.reason)
        raise ConfigError(path, errors[0] if len(errors) == 1 else f"got {_describe(value)}, expected {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"unknown value {value!r} (expected one of {', '.join(map(repr, args))})")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        return from_dict(annotation, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        return {k: _convert(v, args[1] if args else Any, join(path, k)) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_describe(value)}")
        return value
    return value


def join(path: str, key: str) -> str:
    """'a.b' + 'c' -> 'a.b.c'; the root path '' + 'c' -> 'c'."""
    return f"{path}.{key}" if path else key


def from_dict(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass `cls` from mapping `data`; errors name `path.field`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "config", f"expected a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(join(path, key), f"unknown key (expected one of {', '.join(sorted(fields))})")
    kwargs = {name: _convert(value, hints[name], join(path, name)) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of `from_dict`: plain dicts/lists, suitable for YAML, JSON and MLflow params."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def require(condition: bool, path: str, reason: str) -> None:
    """Raise ConfigError(path, reason) unless `condition` holds."""
    if not condition:
        raise ConfigError(path, reason)
