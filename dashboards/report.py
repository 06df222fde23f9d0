"""The study report: one self-contained HTML page with what a study found, also logged to MLflow.

It reads like a paper's results section: the claims and whether they hold, then the figures
(loss vs compute with the fitted laws, recall and loss vs memory size, the multipliers, then the
figures of other analyses such as the joint law or continual learning), then the tables behind
them (a summary, the grid of every cell's status and final metrics, the fitted laws with their
intervals), and last the study definition (its YAML), folded. `write_report` writes
`<out_dir>/report.html` and `<out_dir>/plots/<name>.png` (default out dir `<workdir>/report/`)
and logs both under the artifact path `report/` of the study's parent MLflow run. The study
controller calls it at the end of `study run`; `memlayers report` calls it on demand.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from memlayers.dashboards.figure import Plot, family_label
from memlayers.dashboards.html_parts import esc, fmt, interval, page, png_data_uri, table
from memlayers.dashboards.laws_view import StudyLaws, load_laws
from memlayers.dashboards.plot_continual import continual_plots
from memlayers.dashboards.plot_joint import joint_plots
from memlayers.dashboards.plots import all_plots
from memlayers.dashboards.study_data import FAMILY_ORDER, StudyData, load_study
from memlayers.platform.cluster.storage import write_local_atomic
from memlayers.platform.laws.result import fit_warning
from memlayers.platform.study.record import StudyRecord
from memlayers.platform.tracking.client import client_for, with_retry
from memlayers.platform.tracking.study_ref import StudyRef

log = logging.getLogger(__name__)

SECTIONS = ("claims", "plots", "summary", "grid", "laws", "definition")  # the order of the page
HEADLINE_ORDER = ("loss_vs_compute", "metrics_vs_memory")  # the first figure the study can draw
ARTIFACT_PATH = "report"


class NoHeadlineFigure(ValueError):
    """The study lacks what the headline figure needs, so `figure_path` cannot be written."""


def _meta(data: StudyData) -> str:
    ref = data.ref
    parts = [f"tracking <code>{esc(ref.tracking_uri)}</code>", f"work dir <code>{esc(ref.workdir)}</code>"]
    if data.experiment_id is not None:
        parts.append(f"experiment {esc(data.experiment_id)}")
    if data.parent_run_id:
        parts.append(f"parent run <code>{esc(data.parent_run_id)}</code>")
    parts.append("generated " + dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"))
    return f'<p class="meta">{" · ".join(parts)}</p>'


def _best(data: StudyData, family: str, metric: str, lower_is_better: bool):
    cells = [c for c in data.finished_cells() if c.family == family and c.metrics.get(metric) is not None]
    if not cells:
        return None
    return (min if lower_is_better else max)(cells, key=lambda c: c.metrics[metric])


def claims_section(laws: StudyLaws) -> str:
    """The study's claims first, as sentences marked holds / does not hold, with their margins."""
    claims = (laws.laws or {}).get("claims")
    if not claims:
        note = "this study states no claims" if claims == [] else "no claims checked (laws refitted without them)"
        return f'<section id="claims"><h2>Claims</h2><p class="note">{esc(note)}</p></section>'
    items = []
    for claim in claims:
        verdict = "holds" if claim["holds"] else "does not hold"
        per_seed = ", ".join(f"seed {s}: {fmt(d, 3)}" for s, d in claim.get("differences", {}).items())
        items.append(f'<li class="claim {"holds" if claim["holds"] else "fails"}"><b>{esc(verdict.upper())}</b> '
                     f'— {esc(claim["claim"])} <span class="id">({esc(claim["id"])})</span><br>'
                     f'{esc(claim["metric"])} margin {fmt(claim["effect"], 3) if claim["effect"] is not None else "-"} '
                     f'{esc(interval(claim.get("interval")))}; {len(claim["seeds_holding"])}/{len(claim["seeds"])} '
                     f'seeds hold ({esc(per_seed) or esc(claim.get("note", ""))})</li>')
    return f'<section id="claims"><h2>Claims</h2><ul class="claims">{"".join(items)}</ul></section>'


def summary_section(data: StudyData, laws: StudyLaws) -> str:
    counts = data.status_counts()
    items = [f"{len(data.cells)} cell runs: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
             if data.cells else "no cell runs recorded yet"]
    families = sorted({c.family for c in data.cells}, key=lambda f: (FAMILY_ORDER + (f,)).index(f))
    for family in families:
        parts = []
        for metric, lower, name in (("val_loss", True, "lowest validation loss"),
                                    ("qa_exact_match", False, "best QA exact match")):
            cell = _best(data, family, metric, lower)
            if cell is not None:
                parts.append(f"{name} {fmt(cell.metrics[metric])} ({esc(cell.run_name)}, "
                             f"{fmt(cell.train_flops, 3)} FLOPs)")
        if parts:
            items.append(f"<b>{esc(family_label(family))}</b>: " + "; ".join(parts))
    for reference in ("dense", "moe"):
        comparisons, _ = laws.multipliers(reference)
        for family, comp in sorted((comparisons or {}).items()):
            if isinstance(comp, dict) and comp.get("k") is not None:
                items.append(f"<b>{esc(family_label(family))}</b> is worth {fmt(comp['k'], 3)}× "
                             f"{esc(interval(comp.get('k_interval')))} the compute of "
                             f"{esc(family_label(reference))} (compute-equivalent multiplier)")
    body = "".join(f"<li>{item}</li>" for item in items)
    return f'<section id="summary"><h2>Summary</h2><ul class="summary">{body}</ul></section>'


def definition_section(data: StudyData) -> str:
    if data.definition is None:
        content = '<p class="placeholder">The study definition was not found (no study file given and none ' \
                  "logged to the study's parent run).</p>"
    else:
        content = (f'<details><summary>from {esc(data.definition_source)}</summary>'
                   f"<pre>{esc(data.definition)}</pre></details>")
    return f'<section id="definition"><h2>Study definition</h2>{content}</section>'


GRID_HEADERS = ["run", "cell", "family", "base", "memory / experts", "seed", "status", "train FLOPs",
                "total params", "active params", "val loss", "QA exact match", "QA answer NLL", "train loss", "note"]


def grid_section(data: StudyData) -> str:
    if not data.cells:
        return ('<section id="grid"><h2>Grid</h2><p class="placeholder">No cell runs in the tracking store '
                f"for study {esc(data.ref.name)}.</p></section>")
    rows, classes = [], []
    for c in data.cells:
        rows.append([
            esc(c.run_name), f"<code>{esc(c.cell_id)}</code>", esc(family_label(c.family)), esc(c.base),
            esc(c.variant or "—"), fmt(c.seed), f'<span class="badge {esc(c.status)}">{esc(c.status.lower())}</span>',
            fmt(c.train_flops, 3), fmt(_int_tag(c.tags.get("total_params"))),
            fmt(_int_tag(c.tags.get("active_params"))),
            fmt(c.metrics.get("val_loss")), fmt(c.metrics.get("qa_exact_match")), fmt(c.metrics.get("qa_answer_nll")),
            fmt(c.metrics.get("loss")), esc(c.failure_reason),
        ])
        classes.append(f"status-{c.status}")
    return (f'<section id="grid"><h2>Grid</h2><p class="meta">{len(data.cells)} cells; final metrics are the '
            "latest logged values.</p>" + table(GRID_HEADERS, rows, numeric={5, 7, 8, 9, 10, 11, 12, 13},
                                               row_classes=classes, table_id="grid-table") + "</section>")


def _int_tag(text: str | None) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def _params_cell(entry: dict) -> str:
    intervals = entry.get("intervals") or {}
    return "<br>".join(f"{esc(name)} = {fmt(value)} {esc(interval(intervals.get(name)))}"
                       for name, value in entry["params"].items())


def _skipped(reason: str) -> str:
    return f'<span class="skipped">skipped: {esc(reason)}</span>'


LAW_FORMS = {"compute": "L(C) = E + A·C^−α", "memory": "L(M) = E + A·M^−γ",
             "recall": "R(M) = floor + (ceiling − floor)·σ(slope·(ln M − log_m_mid))"}


def _law_rows(named: list[tuple[str, str, dict]]) -> list[list[str]]:
    rows = []
    for name, target, entry in named:
        if not isinstance(entry, dict):
            continue
        if "skipped" in entry:
            rows.append([esc(name), esc(target), "—", _skipped(entry["skipped"]), "", ""])
            continue
        if "params" not in entry:
            continue
        boot = (entry.get("details") or {}).get("bootstrap") or {}
        boot_text = f"{boot['replicates']} replicates" if "replicates" in boot else esc(boot.get("skipped", "none"))
        warning = fit_warning(entry)
        if warning:
            boot_text += f'<br><span class="skipped">{esc(warning)}</span>'
        rows.append([esc(name), esc(target), esc(LAW_FORMS.get(entry.get("law"), entry.get("law", ""))),
                     _params_cell(entry), fmt(entry.get("n_points")), boot_text])
    return rows


LAW_HEADERS = ["fit", "target", "law", "parameters [95% interval]", "points", "bootstrap"]


def laws_section(laws: StudyLaws) -> str:
    parts = ['<section id="laws"><h2>Fitted laws</h2>']
    if laws.laws is None:
        parts.append(f'<p class="placeholder">No laws fitted: {esc(laws.note or "unknown reason")}.</p></section>')
        return "".join(parts)
    parts.append(f'<p class="meta">source: {esc(laws.source)}' + (f" — {esc(laws.note)}" if laws.note else "") + "</p>")
    compute = [(name, "val_loss", entry) for name, entry in laws.laws.get("compute_laws", {}).items()]
    parts.append("<h3>Compute laws</h3>" + table(LAW_HEADERS, _law_rows(compute), numeric={4}, table_id="compute-laws"))
    memory = [(group, metric, entry) for group, metrics in laws.laws.get("memory_laws", {}).items()
              for metric, entry in (metrics.items() if isinstance(metrics, dict) else [])]
    parts.append("<h3>Memory-size laws</h3>"
                 + table(LAW_HEADERS, _law_rows(memory), numeric={4}, table_id="memory-laws"))
    rows = []
    for reference, comparisons in laws.laws.get("multipliers", {}).items():
        if isinstance(comparisons, dict) and "skipped" in comparisons:
            rows.append([esc(reference.replace("_", " ")), "—", _skipped(comparisons["skipped"]), ""])
            continue
        for family, comp in sorted((comparisons or {}).items()):
            if "skipped" in comp:
                rows.append([esc(reference.replace("_", " ")), esc(family_label(family)),
                             _skipped(comp["skipped"]), ""])
                continue
            k_text = f"k = {fmt(comp.get('k'), 3)} {esc(interval(comp.get('k_interval')))}"
            if comp.get("at_bound"):
                k_text += " (at the fit's bound)"
            runs = comp.get("runs", [])
            unbounded = sum(1 for r in runs if r.get("unbounded"))
            rows.append([esc(reference.replace("_", " ")), esc(family_label(family)), k_text,
                         f"{len(runs)} runs" + (f", {unbounded} unbounded" if unbounded else "")])
    parts.append("<h3>Compute-equivalent multipliers</h3>"
                 + table(["reference", "family", "multiplier [95% interval]", "runs"], rows, table_id="multipliers"))
    skipped = laws.laws.get("skipped") or []
    if skipped:
        items = "".join(f"<li>{esc(s)}</li>" for s in skipped)
        parts.append(f'<h3>Not fitted</h3><ul class="notes">{items}</ul>')
    parts.append("</section>")
    return "".join(parts)


def figure_html(plot: Plot) -> str:
    notes = "".join(f"<li>{esc(n)}</li>" for n in plot.notes)
    notes_html = f'<ul class="notes">{notes}</ul>' if notes else ""
    if plot.png is None:
        body = f'<div class="placeholder">No figure: {esc(plot.note)}.</div>'
    else:
        body = f'<img src="{png_data_uri(plot.png)}" alt="{esc(plot.title)}">'
    return (f'<figure id="plot-{esc(plot.key)}"><h3>{esc(plot.title)}</h3>{body}'
            f"<figcaption>{esc(plot.caption)}</figcaption>{notes_html}</figure>")


def plots_section(plots: list[Plot]) -> str:
    return '<section id="plots"><h2>Figures</h2>' + "".join(figure_html(p) for p in plots) + "</section>"


def render(data: StudyData, laws: StudyLaws, plots: list[Plot]) -> str:
    """The whole page as a string."""
    body = (f"<h1>Study report: {esc(data.ref.name)}</h1>{_meta(data)}" + claims_section(laws)
            + plots_section(plots) + summary_section(data, laws) + grid_section(data) + laws_section(laws)
            + definition_section(data))
    return page(f"{data.ref.name} — memlayers study report", body)


def log_report(data: StudyData, out_dir: Path) -> bool:
    """Log the page and the PNGs under `report/` of the parent run; False when there is none."""
    if not data.parent_run_id:
        log.warning("study %s has no parent run (tag memlayers.role=study): report not logged to MLflow", data.ref.name)
        return False
    client = client_for(data.ref.tracking_uri)
    run_id = data.parent_run_id
    with_retry(lambda: client.log_artifact(run_id, str(out_dir / "report.html"), artifact_path=ARTIFACT_PATH))
    for png in sorted((out_dir / "plots").glob("*.png")):
        with_retry(lambda png=png: client.log_artifact(run_id, str(png), artifact_path=f"{ARTIFACT_PATH}/plots"))
    return True


def headline_plot(plots: list[Plot]) -> Plot:
    """Loss vs compute when the study spans several budgets, else the memory-size figure
    (a FLOP-matched study compares families at one budget)."""
    by_key = {p.key: p for p in plots}
    for key in HEADLINE_ORDER:
        if key in by_key and by_key[key].png is not None:
            return by_key[key]
    reasons = "; ".join(f"{key}: {by_key[key].note}" for key in HEADLINE_ORDER if key in by_key)
    raise NoHeadlineFigure(f"no headline figure: {reasons}")


def write_report(ref: StudyRef, out_dir: Path | None = None, *, log_artifacts: bool = True,
                 figure_path: Path | None = None, bootstrap: int | None = None) -> Path:
    """Write the study's report (and its PNGs); returns the path of report.html.

    `figure_path` also writes the headline figure there (`headline_plot`; NoHeadlineFigure when
    the study can draw neither). Laws are the study's recorded ones when current, else fitted and
    recorded now (`laws_view.load_laws`; `bootstrap` defaults to the study's `fit.bootstrap`), unless
    the study disables fitting. Every file is written whole (temp file, fsync, rename).
    """
    out_dir = Path(out_dir) if out_dir is not None else StudyRecord.of_ref(ref).report_dir()
    data = load_study(ref)
    laws = load_laws(ref, bootstrap=bootstrap, log=log_artifacts)
    plots = all_plots(data, laws) + continual_plots(data) + joint_plots(ref.workdir)
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        stale = plots_dir / f"{plot.key}.png"
        if plot.png is not None:
            write_local_atomic(stale, plot.png)
        elif stale.exists():
            stale.unlink()  # an old figure must not outlive the data it showed
    path = out_dir / "report.html"
    write_local_atomic(path, render(data, laws, plots).encode("utf-8"))
    if figure_path is not None:
        headline = headline_plot(plots)
        write_local_atomic(Path(figure_path), headline.png)
    if log_artifacts:
        log_report(data, out_dir)
    return path
