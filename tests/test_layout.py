"""The package layout: namespace subpackages that never shadow the standard library."""

import subprocess
import sys
import sysconfig

from conftest import REPO_ROOT


def test_platform_is_the_standard_library_from_the_repository_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.__file__); print(platform.python_version())"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0].startswith(sysconfig.get_paths()["stdlib"]), out[0]
    assert out[1] == sys.version.split()[0]


def test_code_folders_are_namespace_packages():
    for folder in ("platform", "models", "kernels", "dashboards"):
        assert not (REPO_ROOT / folder / "__init__.py").exists(), folder


def test_memlayers_subpackages_import_from_the_repository():
    out = subprocess.run(
        [sys.executable, "-c", "import memlayers.models.transformer as t, memlayers.platform.cli.main as c; "
                               "print(t.__file__); print(c.__file__)"],
        cwd="/", capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] == str(REPO_ROOT / "models" / "transformer.py")
    assert out[1] == str(REPO_ROOT / "platform" / "cli" / "main.py")


def test_pytest_collects_from_the_repository_root():
    result = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "tests/test_layout.py"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_platform_is_the_standard_library_from_the_repository_root" in result.stdout
