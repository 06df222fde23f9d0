"""The direction of imports (docs/architecture.md), held by parsing every module, function-level imports included.

- kernels/ imports nothing of memlayers; models/ imports only kernels/ (and the root config_schema);
  neither imports ray, mlflow, optuna or datasets;
- nothing outside platform/cli/ names memlayers.dashboards (dashboards' own modules aside), by
  import or by string;
- an import inside a function outside platform/cli/ carries a one-line reason: a comment on one
  of the lines of its run of imports, or on the line right above that run;
- no import cycle between modules: every import counts (module level, inside a function, under
  `if TYPE_CHECKING`), since a deferred import only hides a circle that a reader still has to untangle.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from conftest import REPO_ROOT

CODE_FOLDERS = ("kernels", "models", "platform", "dashboards")
FRAMEWORKS = ("ray", "mlflow", "optuna", "datasets")


def _modules(root: Path):
    for folder in CODE_FOLDERS:
        yield from sorted((root / folder).rglob("*.py"))
    yield root / "config_schema.py"


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _function_import_groups(tree: ast.AST) -> list[list[ast.stmt]]:
    """Runs of consecutive import statements inside function bodies (at any depth)."""
    groups: list[list[ast.stmt]] = []

    def scan(body: list[ast.stmt]) -> None:
        run: list[ast.stmt] = []
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                run.append(stmt)
                continue
            if run:
                groups.append(run)
                run = []
            for field in ("body", "orelse", "finalbody", "handlers"):
                scan(getattr(stmt, field, []) or [])
        if run:
            groups.append(run)

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            scan(node.body)
    return groups


def _has_reason(group: list[ast.stmt], lines: list[str]) -> bool:
    """A comment on one of the group's lines, or on the line right above it."""
    first, last = group[0].lineno - 1, group[-1].end_lineno
    return any("#" in line for line in lines[first:last]) or (first > 0 and "#" in lines[first - 1])


def layering_violations(root: Path) -> list[str]:
    """Every breach of the rules above in the tree at `root`, one line each."""
    problems = []
    for path in _modules(root):
        rel = path.relative_to(root)
        area = rel.parts[0] if len(rel.parts) > 1 else "root"
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, str(rel))
        for node in ast.walk(tree):
            for name in _imported(node):
                top = name.split(".")[0]
                where = f"{rel}:{node.lineno}"
                if area in ("kernels", "models", "root") and top in FRAMEWORKS:
                    problems.append(f"{where}: {area}/ imports {top}")
                if area in ("kernels", "root") and name.startswith("memlayers.") and not name.startswith(
                        ("memlayers.kernels", "memlayers.config_schema")):
                    problems.append(f"{where}: {area} imports {name}")
                if area == "models" and name.startswith("memlayers.") and not name.startswith(
                        ("memlayers.kernels", "memlayers.models", "memlayers.config_schema")):
                    problems.append(f"{where}: models/ imports {name}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "memlayers.dashboards" in node.value and area != "dashboards" \
                    and rel.parts[:2] != ("platform", "cli"):
                problems.append(f"{rel}:{node.lineno}: names memlayers.dashboards")
            for name in _imported(node):
                if name.startswith("memlayers.dashboards") and area != "dashboards" \
                        and rel.parts[:2] != ("platform", "cli"):
                    problems.append(f"{rel}:{node.lineno}: imports {name} outside platform/cli/")
        if rel.parts[:2] != ("platform", "cli"):
            for group in _function_import_groups(tree):
                if not _has_reason(group, lines):
                    problems.append(f"{rel}:{group[0].lineno}: function-level import without a reason: "
                                    f"{lines[group[0].lineno - 1].strip()}")
    return sorted(set(problems))


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(("memlayers",) + (parts[:-1] if parts[-1] == "__init__" else parts))


def _target(name: str, known: set[str]) -> str | None:
    """The module an imported name lands in: itself, or the module that holds the imported object."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of memlayers it imports, anywhere in its body."""
    paths = {_module_name(root, path): path for path in _modules(root)}
    known = set(paths)
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = _imported(node)
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                head = f"{base}.{node.module}" if node.module else base
                names = [head] + [f"{head}.{alias.name}" for alias in node.names]
            for name in names:
                target = _target(name, known) if name.startswith("memlayers.") else None
                if target is not None and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted; only those of two modules or more."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle inside a component, from its first module back to it (breadth first)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return component


# A finetuning study's cells are expanded from its source study's cells, so study.cells.expand hands a
# finetuning study to finetune.cells, which expands (and reads, through study.validate) the source study.
# Breaking that circle moves the dispatch above both modules, into every caller of `expand`.
ALLOWED_CYCLES = [frozenset({"platform.finetune.cells", "platform.study.cells", "platform.study.validate"})]


def import_cycles(root: Path) -> list[str]:
    """One line per circle of imports not in ALLOWED_CYCLES: the modules around it, in import order."""
    graph = import_graph(root)
    found = []
    for component in _components(graph):
        if frozenset(name.removeprefix("memlayers.") for name in component) not in ALLOWED_CYCLES:
            found.append(" -> ".join(name.removeprefix("memlayers.") for name in _cycle_through(graph, component)))
    return found


def test_the_repository_keeps_its_layers():
    assert layering_violations(REPO_ROOT) == []


def test_no_module_imports_itself_through_others():
    assert import_cycles(REPO_ROOT) == []


def test_each_allowed_cycle_still_exists():
    """An allowance outlives its circle only until this fails: then it is deleted."""
    present = [frozenset(name.removeprefix("memlayers.") for name in c) for c in _components(import_graph(REPO_ROOT))]
    assert [allowed for allowed in ALLOWED_CYCLES if allowed not in present] == []


def test_planted_cycles_are_found_with_their_modules(tmp_path):
    (tmp_path / "config_schema.py").write_text('"""x"""\n')
    area = tmp_path / "platform" / "area"
    area.mkdir(parents=True)
    (area / "low.py").write_text('"""x"""\n\n\ndef f():\n    from memlayers.platform.area.high import g  # x\n')
    (area / "high.py").write_text('"""x"""\nfrom memlayers.platform.area import mid\n')
    (area / "mid.py").write_text('"""x"""\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n'
                                 '    from memlayers.platform.area.low import f\n')
    (area / "alone.py").write_text('"""x"""\nfrom memlayers.platform.area.low import f\n')
    assert import_cycles(tmp_path) == ["platform.area.high -> platform.area.mid -> platform.area.low -> "
                                       "platform.area.high"]
    (area / "mid.py").write_text('"""x"""\n')
    assert import_cycles(tmp_path) == []


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for folder in CODE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "config_schema.py", root / "config_schema.py")
    return root


def test_planted_violations_are_each_found(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "kernels" / "planted_a.py").write_text('"""x"""\nimport mlflow\nfrom memlayers.models import config\n')
    (root / "models" / "planted_b.py").write_text(
        '"""x"""\n\n\ndef f():\n    from memlayers.platform.train import loop  # x\n')
    (root / "platform" / "study" / "planted_c.py").write_text(
        '"""x"""\nimport importlib\n\n\ndef f():\n    import json\n'
        '    return importlib.import_module("memlayers.dashboards.report")\n')
    found = "\n".join(layering_violations(root))
    assert "kernels/planted_a.py:2: kernels/ imports mlflow" in found
    assert "kernels/planted_a.py:3: kernels imports memlayers.models" in found
    assert "models/planted_b.py:5: models/ imports memlayers.platform.train" in found
    assert "platform/study/planted_c.py:7: names memlayers.dashboards" in found
    assert "platform/study/planted_c.py:6: function-level import without a reason" in found


def test_the_cli_may_import_dashboards(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "platform" / "cli" / "planted_d.py").write_text(
        '"""x"""\n\n\ndef f():\n    from memlayers.dashboards.report import write_report\n')
    assert layering_violations(root) == layering_violations(REPO_ROOT)
