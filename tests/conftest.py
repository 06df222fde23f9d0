"""Shared test settings: offline, no Ray usage stats, small thread pools, repository paths."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


RAY_FIXTURES = {"ray_local", "ray_head", "ray_two_nodes"}


def pytest_runtest_logreport(report):
    """Each test phase's outcome, appended as it happens, for tests/run_suite.py's verdict."""
    path = os.environ.get("MEMLAYERS_TEST_OUTCOMES")
    if path:
        with open(path, "a") as handle:
            handle.write(f"{report.nodeid}\t{report.when}\t{report.outcome}\n")


def pytest_collection_modifyitems(items):
    """A test that takes a Ray cluster fixture is a `ray` test (markers: see pyproject.toml)."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole test session (2 CPUs, 127.0.0.1)."""
    from memlayers.platform.cluster.session import ray_cluster

    with ray_cluster(None, num_cpus=2):
        yield
