"""The report of a real smoke study: run by the controller on local Ray, written at the end of the
study, logged to the parent run, and read in headless Chromium."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from browser import find_chromium
from conftest import REPO_ROOT
from dashboards_helpers import inspect_report

from memlayers.dashboards.report import SECTIONS, write_report

SMOKE = REPO_ROOT / "studies" / "smoke.yaml"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_of_a_finished_smoke_study(tmp_path, ray_local):
    from memlayers.platform.study.cells import expand
    from memlayers.platform.study.controller import run_study
    from memlayers.platform.study.validate import load_study
    from memlayers.platform.tracking.client import client_for

    data = yaml.safe_load(SMOKE.read_text())
    data.update(name="dash-smoke", workdir=str(tmp_path / "wd"), report=True)
    path = tmp_path / "dash-smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    study = load_study(path)
    result = run_study(study, poll_interval=0.5, report=write_report)

    report = tmp_path / "wd" / "report" / "report.html"
    assert result.report is not None and Path(result.report) == report  # written by the controller
    page = inspect_report(report, tmp_path / "smoke-report.png")
    assert page["sections"] == list(SECTIONS)
    assert page["images"] and all(i["ok"] and i["w"] > 200 and i["h"] > 100 for i in page["images"]), page["images"]
    names = [cell.name for cell in expand(study, account_budgets=False)]
    assert len(page["grid"]) == len(names)
    for name in names:
        assert any(row.startswith(name) and "finished" in row for row in page["grid"]), (name, page["grid"])
    html = report.read_text()
    assert "name: dash-smoke" in html.split("<details", 1)[1]  # the study definition, folded at the end
    assert page["network"] == [], page["network"]
    assert page["screenshot_size"][1] > 900

    artifacts = {a.path for a in client_for(result.tracking_uri).list_artifacts(result.parent_run_id, "report")}
    assert "report/report.html" in artifacts
