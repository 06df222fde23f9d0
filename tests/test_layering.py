"""The direction of imports (docs/architecture.md), held by parsing every module, function-level imports included.

- kernels/ imports nothing of memlayers; models/ imports only kernels/ (and the root config_schema);
  neither imports ray, mlflow, optuna or datasets;
- nothing outside platform/cli/ names memlayers.dashboards (dashboards' own modules aside), by
  import or by string;
- an import inside a function outside platform/cli/ carries a one-line reason: a comment on one
  of the lines of its run of imports, or on the line right above that run.
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


def test_the_repository_keeps_its_layers():
    assert layering_violations(REPO_ROOT) == []


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for folder in CODE_FOLDERS:
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "config_schema.py", root / "config_schema.py")
    return root


def test_planted_violations_are_each_found(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "kernels" / "planted_a.py").write_text('"""x"""\nimport mlflow\nfrom memlayers.models import config\n')
    (root / "models" / "planted_b.py").write_text('"""x"""\n\n\ndef f():\n    from memlayers.platform.train import loop  # x\n')
    (root / "platform" / "study" / "planted_c.py").write_text(
        '"""x"""\nimport importlib\n\n\ndef f():\n    import json\n    return importlib.import_module("memlayers.dashboards.report")\n')
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
