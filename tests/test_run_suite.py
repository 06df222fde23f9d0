"""tests/run_suite.py: a pytest process that dies before its summary still yields a verdict line."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT

DYING = '''
import os, signal
def test_passes(): pass
def test_fails(): assert False
def test_kills_its_process(): os.kill(os.getpid(), signal.SIGKILL)
'''


def _run_suite(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "run_suite.py"), "-q", "-p", "no:cacheprovider",
                           str(folder)], capture_output=True, text=True, timeout=120, cwd=folder)


def test_a_killed_pytest_still_ends_with_a_verdict_line(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_dying.py").write_text(DYING)
    result = _run_suite(tmp_path)
    lines = result.stdout.strip().splitlines()
    assert "without its summary line" in lines[-2]
    assert lines[-1] == "1 passed, 2 failed, 0 skipped"
    assert result.returncode != 0


def test_a_normal_run_keeps_pytests_own_summary_and_exit_code(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_fine.py").write_text("def test_passes():\n    pass\n")
    result = _run_suite(tmp_path)
    assert result.returncode == 0
    assert "1 passed" in result.stdout and "without its summary" not in result.stdout
