"""The memory-size figure: loss and factual recall against the number of memory slots at one base.

One panel per metric (validation loss, QA exact match, QA answer NLL — those the study logged);
`factual_qa_vs_memory` draws the downstream scores (`memlayers eval`, a study's eval stage) the
same way, one accuracy and one answer-NLL panel per task.
Memory families are points (mean over seeds, bars = min–max) with their fitted memory-size law
(L(M) = E + A·M^(−γ) for losses, the logistic recall curve for exact match) and its bootstrap band.
Dense and MoE runs are horizontal reference lines: the same base, plus the other dense bases
with their compute relative to the memory runs, so one can read off "a memory of size M matches
a dense model k× bigger". The base shown is the one with the most memory sizes; in a study with
several budgets (an iso-FLOP sweep), the budget with the most runs.
"""

from __future__ import annotations

import numpy as np

from memlayers.dashboards.bands import grid, law_curve
from memlayers.dashboards.figure import (
    MissingData,
    Plot,
    family_color,
    family_label,
    make_plot,
    new_figure,
    tidy_log_axis,
)
from memlayers.dashboards.laws_view import StudyLaws
from memlayers.dashboards.plot_scaling import law_label
from memlayers.dashboards.study_data import Cell, StudyData, base_order
from memlayers.models.presets import memory_size_name
from memlayers.platform.tracking.conventions import EVAL_PREFIX

METRICS = {
    "val_loss": ("validation loss (nats/token, log scale)", "log"),
    "qa_exact_match": ("QA exact match (fraction of facts recalled)", "linear"),
    "qa_answer_nll": ("QA answer NLL (nats per answer, log scale)", "log"),
}
TITLES = {"val_loss": "Loss", "qa_exact_match": "Factual recall", "qa_answer_nll": "Answer likelihood"}
DOWNSTREAM_NAMES = {"exact_match": "exact match", "f1": "F1 (token overlap)", "acc": "accuracy",
                    "acc_norm": "accuracy (length-normalised)"}
REFERENCE_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)))


def pick_base(cells: list[Cell]) -> str:
    """The base with the most distinct memory sizes (then most cells, then the smaller base)."""
    sizes: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for cell in cells:
        sizes.setdefault(cell.base, set()).add(cell.memory_slots)
        counts[cell.base] = counts.get(cell.base, 0) + 1
    return min(sizes, key=lambda b: (-len(sizes[b]), -counts[b], base_order(b)))


def _summary(cells: list[Cell], metric: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Per memory size: mean, min and max of `metric` over the cells (seeds)."""
    by_size: dict[int, list[float]] = {}
    for cell in cells:
        if cell.metrics.get(metric) is not None:
            by_size.setdefault(cell.memory_slots, []).append(cell.metrics[metric])
    sizes = sorted(by_size)
    values = [np.asarray(by_size[s]) for s in sizes]
    return (sizes, np.array([v.mean() for v in values]), np.array([v.min() for v in values]),
            np.array([v.max() for v in values]))


def pick_budget(cells: list[Cell]) -> str | None:
    """The budget (the study's `budget` tag) with the most cells, largest first on ties; None when
    the cells share one budget (or carry no budget tag)."""
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.tags.get("budget", "")] = counts.get(cell.tags.get("budget", ""), 0) + 1
    if len(counts) < 2:
        return None

    def size(budget: str) -> float:
        try:
            return float(budget)
        except ValueError:
            return 0.0

    return max(counts, key=lambda b: (counts[b], size(b)))


def _references(data: StudyData, base: str, budget: str | None) -> list[tuple[str, str, list[Cell]]]:
    """(family, base, cells) of the dense and MoE runs to draw as reference lines."""
    baselines = [c for c in data.finished_cells() if c.family in ("dense", "moe")
                 and (budget is None or c.tags.get("budget", budget) == budget)]
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in baselines:
        groups.setdefault((cell.family, cell.base), []).append(cell)
    chosen = [key for key in groups if key[0] == "dense" or key[1] == base]
    chosen.sort(key=lambda key: (key[1] != base, key[0], base_order(key[1])))
    return [(family, b, groups[(family, b)]) for family, b in chosen[:len(REFERENCE_STYLES)]]


def _compute_ratio(cells: list[Cell], memory_cells: list[Cell]) -> str:
    ref = [c.train_flops for c in cells if c.train_flops]
    mem = [c.train_flops for c in memory_cells if c.train_flops]
    if not ref or not mem:
        return ""
    return f", {np.median(ref) / np.median(mem):.2g}× the FLOPs"


def axis_of(metric: str) -> tuple[str, str, str]:
    """(axis label, y scale, panel title) of a metric; downstream scores `eval/<task>/<metric>` too."""
    if metric in METRICS:
        return (*METRICS[metric], TITLES[metric])
    task, name = metric.removeprefix(EVAL_PREFIX).rsplit("/", 1)
    if name == "answer_nll":
        return f"{task} answer NLL (nats per answer, log scale)", "log", f"{task} answer likelihood"
    return f"{task} {DOWNSTREAM_NAMES.get(name, name)}", "linear", f"{task} {DOWNSTREAM_NAMES.get(name, name)}"


def _draw_panel(ax, laws: StudyLaws, base: str, metric: str, memory_cells: list[Cell], references,
                notes: list[str]) -> None:
    label_text, scale, title = axis_of(metric)
    all_sizes: set[int] = set()
    for family in sorted({c.family for c in memory_cells}):
        members = [c for c in memory_cells if c.family == family]
        sizes, mean, low, high = _summary(members, metric)
        if not sizes:
            continue
        all_sizes.update(sizes)
        color = family_color(family)
        ax.errorbar(sizes, mean, yerr=[mean - low, high - mean], fmt="o", color=color, capsize=3, ms=6, zorder=3,
                    label=f"{family_label(family)} {base} runs")
        entry, reason = laws.memory_law(base, family, metric)
        if entry is None:
            notes.append(f"{title}, {family_label(family)}: no fitted law ({reason or laws.note}).")
            continue
        xs, ys = laws.points(entry, "memory_slots", metric)
        curve = law_curve(entry, xs or sizes, ys or mean, grid(min(sizes), max(sizes)))
        if entry["law"] == "recall":
            p = entry["params"]
            label = f"{family_label(family)} fit: logistic in ln M, {p['floor']:.2f} → {p['ceiling']:.2f}"
        else:
            label = law_label(family_label(family), entry, "M", "gamma", "γ")
        ax.plot(curve.x, curve.y, "-", color=color, lw=1.8, label=label)
        if curve.low is not None:
            ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.15, lw=0)
        elif curve.band_note:
            notes.append(f"{title}, {family_label(family)}: {curve.band_note}.")
    for (family, ref_base, cells), style in zip(references, REFERENCE_STYLES):
        values = [c.metrics[metric] for c in cells if c.metrics.get(metric) is not None]
        if values:
            ax.axhline(float(np.mean(values)), color=family_color(family), ls=style, lw=1.3,
                       label=f"{family_label(family)} {ref_base}{_compute_ratio(cells, memory_cells)}")
    ax.set_xscale("log")
    if all_sizes:
        ticks = sorted(all_sizes)
        ax.set_xticks(ticks)
        ax.set_xticklabels([memory_size_name(s) for s in ticks])
        ax.minorticks_off()
    if scale == "log":
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        tidy_log_axis(ax.yaxis, low, high)
    else:  # recall: zoom on the data, but stay within [0, 1]
        low, high = ax.get_ylim()
        ax.set_ylim(max(-0.02, low - 0.05), min(1.02, high + 0.05))
    ax.set_xlabel("memory size M (value slots, log scale)")
    ax.set_ylabel(label_text)
    ax.set_title(f"{title} vs memory size ({base})")
    ax.legend(fontsize=6.5, frameon=False, loc="best")


def _memory_cells(data: StudyData, notes: list[str]) -> tuple[str, list[Cell], list]:
    """The base shown, its memory cells (at the budget with the most runs) and the reference runs."""
    memory = [c for c in data.finished_cells() if c.memory_slots > 0]
    if not memory:
        raise MissingData("the study has no finished memory-layer cell (pkm or memory_plus)")
    base = pick_base(memory)
    memory_cells = [c for c in memory if c.base == base]
    budget = pick_budget(memory_cells)
    if budget is not None:
        notes.append(f"Several budgets on {base}: the figure shows budget {budget}, the one with the most runs.")
        memory_cells = [c for c in memory_cells if c.tags.get("budget", "") == budget]
    return base, memory_cells, _references(data, base, budget)


def downstream_metrics(cells: list[Cell]) -> list[str]:
    """Per task, its accuracy (the paper's: F1 for triviaqa, else exact match) then its answer NLL."""
    keys = {k for c in cells for k, v in c.metrics.items() if k.startswith(EVAL_PREFIX) and v is not None}
    tasks = sorted({k.removeprefix(EVAL_PREFIX).rsplit("/", 1)[0] for k in keys})
    out = []
    for task in tasks:
        accuracy = [f"{EVAL_PREFIX}{task}/{m}" for m in ("f1", "exact_match", "acc_norm", "acc")
                    if f"{EVAL_PREFIX}{task}/{m}" in keys][:1]
        out += accuracy + [k for k in (f"{EVAL_PREFIX}{task}/answer_nll",) if k in keys]
    return out


def factual_qa_vs_memory(data: StudyData, laws: StudyLaws) -> Plot:
    caption = ("Downstream factual QA against memory size at a fixed base model (log x), per task: accuracy "
               "(TriviaQA F1, exact match otherwise; lm-eval's accuracy for other tasks) and the answer NLL "
               "(nats per gold answer given the question). Points: memory runs (mean over seeds, bars = range); "
               "curves: fitted memory-size laws; horizontal lines: dense and MoE runs.")
    notes: list[str] = []

    def draw():
        base, memory_cells, references = _memory_cells(data, notes)
        metrics = downstream_metrics(memory_cells)
        if not metrics:
            raise MissingData(f"the memory cells on {base} have no downstream scores (eval/<task>/<metric>; "
                              "give the study an eval section or run memlayers eval)")
        fig, axes = new_figure(len(metrics), width=5.2, height=4.4)
        for ax, metric in zip(axes, metrics):
            _draw_panel(ax, laws, base, metric, memory_cells, references, notes)
        return fig

    return make_plot("factual_qa_vs_memory", "Factual QA vs memory size, per task", caption, draw, notes)


def metrics_vs_memory(data: StudyData, laws: StudyLaws) -> Plot:
    caption = ("Loss and factual recall against memory size at a fixed base model (log x). Points: memory "
               "runs (mean over seeds, bars = range); curves: fitted memory-size laws with 95% bootstrap "
               "bands; horizontal lines: dense and MoE runs for reference.")
    notes: list[str] = []

    def draw():
        base, memory_cells, references = _memory_cells(data, notes)
        metrics = [m for m in METRICS if any(c.metrics.get(m) is not None for c in memory_cells)]
        if not metrics:
            raise MissingData(f"the memory cells on {base} logged none of {', '.join(METRICS)}")
        if len({c.memory_slots for c in memory_cells}) < 2:
            notes.append(f"Only one memory size on {base}: no memory-size law can be drawn.")
        fig, axes = new_figure(len(metrics), width=5.2, height=4.4)
        for ax, metric in zip(axes, metrics):
            _draw_panel(ax, laws, base, metric, memory_cells, references, notes)
        return fig

    return make_plot("metrics_vs_memory", "Loss and factual recall vs memory size", caption, draw, notes)
