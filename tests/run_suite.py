"""Run pytest so that the suite always ends with its verdict, even when pytest itself does not.

`make test` and CI call this instead of pytest. pytest runs in a session of its own, so that a
signal sent to the process group of a server or a Ray node the tests started cannot reach this
wrapper, and the conftest hook appends every test's outcome to a file as it happens. If pytest ends
without printing its summary line (killed, or a teardown that exits the process), this prints why
and the verdict counted from that file, and exits non-zero.

    python tests/run_suite.py [pytest arguments ...]
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

SUMMARY = re.compile(r"\b\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b.* in \d+(\.\d+)?s\b")
OUTCOMES_ENV = "MEMLAYERS_TEST_OUTCOMES"  # read by tests/conftest.py


def verdict(outcomes_file: Path) -> Counter:
    """Tests by outcome (passed / failed / skipped / error) from the per-phase lines of the hook."""
    phases: dict[str, dict[str, str]] = {}
    for line in outcomes_file.read_text().splitlines():
        nodeid, when, outcome = line.rsplit("\t", 2)
        phases.setdefault(nodeid, {})[when] = outcome
    counts: Counter = Counter()
    for by_phase in phases.values():
        if by_phase.get("setup") == "failed":
            counts["error"] += 1
        elif "failed" in (by_phase.get("call"), by_phase.get("teardown")):
            counts["failed"] += 1
        elif "skipped" in by_phase.values():
            counts["skipped"] += 1
        elif by_phase.get("call") == "passed":
            counts["passed"] += 1
        else:  # set up, never finished: the test the process ended in
            counts["failed"] += 1
    return counts


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as folder:
        outcomes = Path(folder) / "outcomes.tsv"
        outcomes.touch()
        env = {**os.environ, OUTCOMES_ENV: str(outcomes), "PYTHONUNBUFFERED": "1"}  # progress as it happens
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *argv], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # pytest left our group: pass an interrupt on
            signal.signal(sig, lambda received, _frame: proc.send_signal(received))
        summarised = False
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            summarised = summarised or bool(SUMMARY.search(line))
        code = proc.wait()
        if summarised:
            return code
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        counts = verdict(outcomes)
        print(f"pytest ended ({how}) without its summary line; the verdict from the per-test log:")
        print(f"{counts['passed']} passed, {counts['failed'] + counts['error']} failed, {counts['skipped']} skipped")
        return code if code > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
