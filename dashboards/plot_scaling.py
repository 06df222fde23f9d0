"""Compute-scaling figures: loss vs training FLOPs with fitted compute laws (the headline figure),
and compute-equivalent multipliers against dense and MoE with their intervals.

Loss vs compute is drawn log-log: a law L(C) = E + A·C^(−α) is a straight line far above E and
bends towards E. The multiplier k of a run is C_ref(L_run) / C_run, how much more compute the
reference family needs for the same loss (k > 1: the run is worth more than its FLOPs).
"""

from __future__ import annotations

import math

from memlayers.dashboards.bands import grid, law_curve
from memlayers.dashboards.figure import (
    MissingData,
    Plot,
    family_color,
    family_label,
    make_plot,
    new_figure,
    short_number,
    tidy_log_axis,
)
from memlayers.dashboards.laws_view import StudyLaws
from memlayers.dashboards.study_data import FAMILY_ORDER, Cell, StudyData

MAX_ANNOTATED = 24
NARROW_RANGE = 2.0  # a compute law fitted over less than this ratio of FLOPs says little
SAME_BUDGET = 1.5   # compute values within this ratio are one budget (FLOP-matched cells)


def _point_label(cell: Cell) -> str:
    return f"{cell.base} {cell.variant}".strip()


def _compute_points(data: StudyData) -> list[Cell]:
    return [c for c in data.finished_cells() if c.train_flops and c.metrics.get("val_loss") is not None]


def _interval_text(entry: dict, name: str, symbol: str) -> str:
    interval = (entry.get("intervals") or {}).get(name)
    if interval and all(v is not None and math.isfinite(v) for v in interval):
        return f", {symbol} ∈ [{interval[0]:.3g}, {interval[1]:.3g}]"
    return ""


def law_label(name: str, entry: dict, variable: str, exponent: str, symbol: str) -> str:
    p = entry["params"]
    text = f"{name} fit: {p['E']:.3g} + {p['A']:.3g}·{variable}^−{p[exponent]:.3g}"
    return text + _interval_text(entry, exponent, symbol)


def _family_of_law(name: str) -> tuple[str, bool]:
    """`memory_plus[slots=4096]` -> ("memory_plus", True)."""
    return name.split("[")[0], "[" in name


def _draw_law(ax, laws: StudyLaws, name: str, entry: dict, x_span: tuple[float, float], notes: list[str]) -> None:
    xs, ys = laws.points(entry, "train_flops", "val_loss")
    if not xs:
        return
    family, variant = _family_of_law(name)
    curve = law_curve(entry, xs, ys, grid(*x_span, pad=1.1))
    color = family_color(family)
    style = "--" if variant else "-"
    ax.plot(curve.x, curve.y, style, color=color, lw=1.8,
            label=law_label(family_label(family) + name[len(family):], entry, "C", "alpha", "α"))
    if curve.low is not None:
        ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.15, lw=0)
    elif curve.band_note:
        notes.append(f"{family_label(family)}{name[len(family):]}: {curve.band_note}.")


def loss_vs_compute(data: StudyData, laws: StudyLaws) -> Plot:
    caption = ("Final validation loss of every finished cell against its training compute (log-log), "
               "with each family's fitted compute law L(C) = E + A·C^−α and its 95% bootstrap band. "
               "At equal FLOPs, lower is better.")
    notes: list[str] = []

    def draw():
        cells = _compute_points(data)
        if not cells:
            raise MissingData("no finished cell has both a final `val_loss` and its training FLOPs")
        flops = sorted({c.train_flops for c in cells})
        if flops[-1] / flops[0] < SAME_BUDGET:
            spread = short_number(flops[0]) + (f"–{short_number(flops[-1])}" if len(flops) > 1 else "")
            raise MissingData(f"every finished cell used about the same training compute ({spread} FLOPs): "
                              "loss vs compute needs runs at several compute budgets (an iso_flops sweep, or "
                              "several bases at a token budget); the memory-size figure compares the families "
                              "at this budget")
        x_all = (min(flops), max(flops))
        fig, (ax,) = new_figure(width=7.8, height=5.0)
        families = sorted({c.family for c in cells}, key=lambda f: (FAMILY_ORDER + (f,)).index(f))
        for family in families:
            members = [c for c in cells if c.family == family]
            ax.scatter([c.train_flops for c in members], [c.metrics["val_loss"] for c in members], s=34,
                       color=family_color(family), edgecolor="white", linewidth=0.6, zorder=3,
                       label=f"{family_label(family)} runs")
            if len(cells) <= MAX_ANNOTATED:
                for c in members:
                    ax.annotate(_point_label(c), (c.train_flops, c.metrics["val_loss"]), fontsize=6.5,
                                xytext=(4, 3), textcoords="offset points", color=family_color(family))
        for name, entry in laws.compute_laws().items():
            family, _ = _family_of_law(name)
            xs, _ = laws.points(entry, "train_flops", "val_loss")
            if not xs:
                continue
            if family != "dense" and max(xs) / min(xs) < NARROW_RANGE:
                notes.append(f"{family_label(family)}{name[len(family):]}: compute law not drawn — fitted over a "
                             f"{max(xs) / min(xs):.2g}× compute range only, its exponent is not meaningful.")
                continue
            # the dense law is the reference every other family is measured against: draw it across
            span = x_all if family == "dense" else (min(xs), max(xs))
            _draw_law(ax, laws, name, entry, span, notes)
        fitted = {_family_of_law(n)[0] for n in laws.compute_laws()}
        for family in families:
            if family not in fitted:
                _, reason = laws.compute_law(family)
                notes.append(f"{family_label(family)}: no compute law ({reason or laws.note}).")
        ax.set_xscale("log")
        ax.set_yscale("log")
        tidy_log_axis(ax.xaxis, flops[0], flops[-1])
        losses = [c.metrics["val_loss"] for c in cells]
        tidy_log_axis(ax.yaxis, min(losses), max(losses))
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("validation loss (nats/token, log scale)")
        ax.set_title("Loss vs training compute")
        ax.legend(fontsize=7, frameon=False, loc="upper right")
        return fig

    return make_plot("loss_vs_compute", "Loss vs training compute", caption, draw, notes)


def _cells_by_run(data: StudyData) -> dict[str, Cell]:
    return {c.run_id: c for c in data.cells}


def _draw_multipliers(ax, data: StudyData, comparisons: dict, reference: str, notes: list[str]) -> int:
    """One panel: per-run multipliers grouped by family, each family's constant k as a band."""
    cells = _cells_by_run(data)
    position, ticks, labels = 0, [], []
    drawn = 0
    for family in sorted(comparisons, key=lambda f: (FAMILY_ORDER + (f,)).index(f)):
        comp = comparisons[family]
        if not isinstance(comp, dict) or "skipped" in comp:
            reason = comp.get("skipped") if isinstance(comp, dict) else "missing"
            notes.append(f"{family_label(family)} vs {reference}: {reason}.")
            continue
        color, start = family_color(family), position
        runs = sorted(comp.get("runs", []), key=lambda r: (cells[r["label"]].memory_slots if r["label"] in cells else 0,
                                                          r.get("compute", 0)))
        for run in runs:
            cell = cells.get(run["label"])
            labels.append(_point_label(cell) if cell else str(run["label"])[:8])
            ticks.append(position)
            if run.get("unbounded") or run.get("multiplier") is None:
                ax.annotate("∞", (position, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                            color=color, fontsize=12)
                notes.append(f"{labels[-1]} ({family_label(family)}): unbounded — its loss is below the "
                             f"{reference} law's floor E.")
            else:
                value = run["multiplier"]
                interval = run.get("interval")
                yerr = None
                if interval and all(v is not None and math.isfinite(v) for v in interval):
                    yerr = [[max(value - interval[0], 0)], [max(interval[1] - value, 0)]]
                ax.errorbar([position], [value], yerr=yerr, fmt="o", color=color, capsize=3, ms=5, zorder=3)
            position += 1
            drawn += 1
        if position > start and comp.get("k") and math.isfinite(comp["k"]):
            k_text = f"{family_label(family)}: k = {comp['k']:.3g}"
            interval = comp.get("k_interval")
            if interval and all(v is not None and math.isfinite(v) for v in interval):
                ax.fill_between([start - 0.4, position - 0.6], interval[0], interval[1], color=color, alpha=0.15, lw=0)
                k_text += f" [{interval[0]:.3g}, {interval[1]:.3g}]"
            ax.hlines(comp["k"], start - 0.4, position - 0.6, color=color, lw=2, label=k_text)
        position += 0.6
    ax.axhline(1.0, color=family_color(reference), ls=":", lw=1.2, label=f"1 = same as {family_label(reference)}")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    tidy_log_axis(ax.yaxis, low, high)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7.5)
    ax.set_ylabel(f"compute-equivalent multiplier vs {family_label(reference)} (×, log scale)")
    ax.set_title(f"Compute worth vs {family_label(reference)}")
    ax.legend(fontsize=7, frameon=False, loc="best")
    return drawn


def compute_multipliers(data: StudyData, laws: StudyLaws) -> Plot:
    caption = ("Compute-equivalent multiplier of each run (points, 95% bootstrap intervals) and each family's "
               "fitted constant k (line and band): the reference family needs k× the run's compute to reach "
               "the same loss. Above 1 = the model is worth more than its FLOPs.")
    notes: list[str] = []

    def draw():
        panels, reasons = [], []
        for reference in ("dense", "moe"):
            comparisons, reason = laws.multipliers(reference)
            if comparisons:
                panels.append((reference, comparisons))
            else:
                reasons.append(f"vs {family_label(reference)}: {reason or laws.note}")
        if not panels:
            raise MissingData("; ".join(reasons) or "no multipliers were fitted")
        notes.extend(f"No multipliers {r}." for r in reasons)
        fig, axes = new_figure(len(panels), width=6.0, height=4.6)
        drawn = sum(_draw_multipliers(ax, data, comps, ref, notes) for ax, (ref, comps) in zip(axes, panels))
        if drawn == 0:
            raise MissingData("no family has a multiplier against the reference laws")
        return fig

    return make_plot("compute_multipliers", "Compute-equivalent multipliers", caption, draw, notes)
