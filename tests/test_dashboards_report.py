"""The study report: rendered in headless Chromium from disk, logged to MLflow, graceful on thin studies."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import find_chromium
from dashboards_helpers import CELLS, build_study, inspect_report, png_size

from memlayers.dashboards.laws_view import LAWS_FILE, StudyLaws, load_laws
from memlayers.dashboards.plots import all_plots
from memlayers.dashboards.report import SECTIONS, render, write_report
from memlayers.dashboards.study_data import Cell, StudyData
from memlayers.platform.tracking.study_ref import StudyRef

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="Chromium is not installed (apt-get install chromium)")
PLOT_KEYS = {"loss_vs_compute", "metrics_vs_memory", "compute_multipliers", "training_curves", "slot_usage"}
ALL_PLOT_KEYS = PLOT_KEYS | {"factual_qa_vs_memory"}  # that one only with downstream scores (memlayers eval)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyRef:
    return build_study(tmp_path_factory.mktemp("study") / "smoke")


@pytest.fixture(scope="module")
def report(study) -> Path:
    return write_report(study, bootstrap=20)


class Resources(HTMLParser):
    """Every src/href/srcset/url(...) of the page and every <script>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.urls += [value for name, value in attrs if name in ("src", "href", "srcset", "action") and value]


@pytest.mark.browser
@needs_chromium
def test_report_renders_in_headless_chromium(report, study, tmp_path):
    """Every section present, every image decoded, a screenshot, nothing loaded from the network."""
    page = inspect_report(report, tmp_path / "report.png")
    assert page["sections"] == list(SECTIONS)
    assert len(page["images"]) == len(PLOT_KEYS), page["images"]
    assert all(img["ok"] and img["w"] > 200 and img["h"] > 100 for img in page["images"]), page["images"]
    assert len(page["grid"]) == len(CELLS)
    failed = [row for row in page["grid"] if "failed" in row]
    assert len(failed) == 1 and "loss is NaN" in failed[0]
    assert "memory_plus-nano-64k-seed0" in page["text"] and "Memory+ is worth" in page["text"]
    width, height = page["screenshot_size"]
    assert width == 1280 and height > 3000, (width, height)  # the whole page, not the viewport
    assert page["network"] == [], page["network"]
    assert page["requested"][0] == report.as_uri()


def test_report_references_nothing_outside_itself(report):
    parser = Resources()
    parser.feed(report.read_text())
    assert parser.scripts == 0
    assert parser.urls and all(u.startswith(("data:image/png;base64,", "#")) for u in parser.urls), parser.urls
    assert "default-src 'none'" in report.read_text()  # the page forbids network loads itself


class Outline(HTMLParser):
    """The page's section ids in order, the section of each <img>, and each <details> (open or folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.image_sections: list[str] = []
        self.details: list[tuple[str, bool]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.image_sections.append(self.sections[-1] if self.sections else "")
        elif tag == "details":
            self.details.append((self.sections[-1], "open" in attrs))


def test_report_reads_claims_figures_tables_then_the_folded_definition(report):
    """Claims first, every figure right after them, the tables, and the study file last and folded."""
    outline = Outline()
    outline.feed(report.read_text())
    assert outline.sections == ["claims", "plots", "summary", "grid", "laws", "definition"]
    assert outline.image_sections and set(outline.image_sections) == {"plots"}, outline.image_sections
    assert outline.details == [("definition", False)]
    text = report.read_text()
    definition = text[text.index('<section id="definition">'):]
    assert definition.index("<details>") < definition.index("<pre>") < definition.index("</details>")


def test_report_files_and_mlflow_artifacts(report, study):
    from mlflow.tracking import MlflowClient

    assert {p.stem for p in (report.parent / "plots").glob("*.png")} == PLOT_KEYS
    client = MlflowClient(tracking_uri=study.tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name(study.name).experiment_id],
                                "tags.`memlayers.role` = 'study'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/report.html", "report/plots"}
    plots = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(parent.info.run_id, "report/plots")}
    assert plots == {f"{k}.png" for k in PLOT_KEYS}


def test_report_fits_laws_with_intervals_from_the_runs(study, report):
    laws = load_laws(study, bootstrap=20)
    dense, _ = laws.compute_law("dense")
    assert dense is not None and abs(dense["params"]["alpha"] - 0.15) < 0.01  # the store's generating law
    assert dense["intervals"]["alpha"][0] <= dense["params"]["alpha"] <= dense["intervals"]["alpha"][1]
    comparisons, _ = laws.multipliers("dense")
    assert comparisons["memory_plus"]["k"] > comparisons["moe"]["k"] > 1.0
    assert "k_interval" in comparisons["memory_plus"]
    html = report.read_text()
    assert "Compute laws" in html and "skipped: compute" in html  # MoE has one compute value


def test_saved_laws_are_used_when_current_and_refitted_when_stale(study, tmp_path):
    from memlayers.platform.laws.study import fit_study
    from memlayers.platform.tracking.runs import load_study_rows

    workdir = tmp_path / "copy"
    (workdir / LAWS_FILE).parent.mkdir(parents=True)
    ref = StudyRef(study.name, workdir, study.tracking_uri)
    from memlayers.platform.study.record import StudyRecord, settings_sha256

    saved = fit_study(load_study_rows(study.name, study.tracking_uri))
    saved["marker"] = "saved"
    saved["provenance"] = {"settings_sha256": settings_sha256(StudyRecord.of_ref(ref).fit_config())}
    (workdir / LAWS_FILE).write_text(json.dumps(saved, default=str))
    current = load_laws(ref, bootstrap=0)
    assert current.laws["marker"] == "saved" and current.source == str(workdir / LAWS_FILE)
    saved["input_sha256"] = "0" * 64
    (workdir / LAWS_FILE).write_text(json.dumps(saved, default=str))
    stale = load_laws(ref, bootstrap=0)
    assert "marker" not in stale.laws and "fitted on other runs" in stale.note
    (workdir / LAWS_FILE).write_text(json.dumps(saved, default=str))  # the refit recorded current laws: stale again
    disabled = load_laws(ref, bootstrap=0, refit=False)
    assert disabled.laws is None and "disables fitting" in disabled.note


def _cell(run_id: str, family: str, flops: float, slots: int = 0, **metrics) -> Cell:
    tags = {"family": family, "base": "nano", "memory_slots": str(slots), "experts": "0", "train_flops": str(flops),
            "cell": run_id}
    return Cell(run_id=run_id, run_name=f"{family}-{run_id}", status="FINISHED", tags=tags, params={},
                metrics={k: float(v) for k, v in metrics.items()})


@pytest.mark.parametrize("cells, expected", [
    ([], {"loss_vs_compute": "no finished cell", "metrics_vs_memory": "no finished memory-layer cell",
          "training_curves": "no cell logged", "slot_usage": "slot usage",
          "factual_qa_vs_memory": "no finished memory-layer cell"}),
    ([_cell("a", "dense", 1e12, val_loss=3.0), _cell("b", "memory_plus", 1.02e12, slots=4096, val_loss=2.9)],
     {"loss_vs_compute": "same training compute", "training_curves": "no cell logged",
      "factual_qa_vs_memory": "no downstream scores"}),
])
def test_figures_degrade_to_notes(cells, expected, tmp_path):
    """A thin study gives notes instead of figures, and the page still renders."""
    data = StudyData(ref=StudyRef("thin", tmp_path, "sqlite:///unused.db"), cells=cells)
    laws = StudyLaws(note="no finished cell runs to fit")
    plots = {p.key: p for p in all_plots(data, laws)}
    assert set(plots) == ALL_PLOT_KEYS
    for key, words in expected.items():
        assert plots[key].png is None and words in plots[key].note, (key, plots[key].note)
    assert plots["compute_multipliers"].png is None
    if cells:
        assert plots["metrics_vs_memory"].png is not None  # one memory size against the dense line
    page = render(data, laws, list(plots.values()))
    assert page.count('class="placeholder"') >= len(expected) and "No laws fitted" in page


def test_report_cli_writes_the_headline_figure_from_a_workdir(study, tmp_path):
    from memlayers.platform.cli.main import main

    figure = tmp_path / "docs" / "headline.png"
    code = main(["report", str(study.workdir), "--out", str(tmp_path / "out"), "--figure", str(figure),
                 "--no-log", "--bootstrap", "0"])
    assert code == 0
    width, height = png_size(figure.read_bytes())
    assert width > 600 and height > 400
    assert figure.read_bytes() == (tmp_path / "out" / "plots" / "loss_vs_compute.png").read_bytes()


def test_report_cli_unknown_study_exits_2_and_creates_nothing(tmp_path, monkeypatch, capsys):
    from memlayers.platform.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["report", "no-such-study"]) == 2
    assert "no tracking store" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
