"""Figures over training time: loss curves of the study's cells and memory slot usage.

x is training tokens (the logged `tokens` metric, matched to the loss by step), or the step when a
run did not log tokens. Slot usage shows `slot_fraction_read` (share of the value table's slots
read at least once so far; higher is better) and `slot_gini` (inequality of reads across slots;
0 = perfectly even) for the memory families.
"""

from __future__ import annotations

from memlayers.dashboards.figure import MissingData, Plot, family_color, family_label, make_plot, new_figure
from memlayers.dashboards.study_data import Cell, StudyData

MAX_LABELLED = 14
LINESTYLES = ("-", "--", "-.", ":")


def series(data: StudyData, cell: Cell, metric: str) -> tuple[list[float], list[float], bool]:
    """(x, y, x_is_tokens) for one metric of one cell; empty lists when it was not logged."""
    history = data.histories.get(cell.run_id, {})
    points = history.get(metric, [])
    tokens = dict(history.get("tokens", []))
    if points and all(step in tokens for step, _ in points):
        return [tokens[step] for step, _ in points], [value for _, value in points], True
    return [float(step) for step, _ in points], [value for _, value in points], False


def _style(cells: list[Cell]) -> dict[str, tuple[str, str]]:
    """Colour by family, line style by the cell's rank within its family."""
    seen: dict[str, int] = {}
    styles = {}
    for cell in cells:
        rank = seen.get(cell.family, 0)
        seen[cell.family] = rank + 1
        styles[cell.run_id] = (family_color(cell.family), LINESTYLES[rank % len(LINESTYLES)])
    return styles


def _draw_metric(ax, data: StudyData, cells: list[Cell], metric: str, styles) -> bool:
    """Plot `metric` of every cell on `ax`; returns whether x is tokens."""
    any_tokens = False
    labelled = len(cells) <= MAX_LABELLED
    families_labelled = set()
    for cell in cells:
        x, y, is_tokens = series(data, cell, metric)
        if not x:
            continue
        any_tokens |= is_tokens
        color, style = styles[cell.run_id]
        if labelled:
            label = cell.run_name + ("" if cell.finished else f" ({cell.status.lower()})")
        else:
            label = family_label(cell.family) if cell.family not in families_labelled else None
            families_labelled.add(cell.family)
        ax.plot(x, y, style, color=color, lw=1.4, alpha=0.9 if cell.finished else 0.5, label=label)
    return any_tokens


def _x_axis(ax, tokens: bool) -> None:
    ax.set_xlabel("training tokens" if tokens else "step")
    ax.set_xscale("log")


def training_curves(data: StudyData) -> Plot:
    caption = ("Training loss of every cell against the tokens it has seen (log x). Colour = family; "
               "faded curves are runs that did not finish.")

    def draw():
        cells = [c for c in data.cells if data.histories.get(c.run_id, {}).get("loss")]
        if not cells:
            raise MissingData("no cell logged a `loss` history yet")
        styles = _style(cells)
        fig, (ax,) = new_figure(width=7.6, height=4.6)
        tokens = _draw_metric(ax, data, cells, "loss", styles)
        _x_axis(ax, tokens)
        ax.set_ylabel("training loss (nats/token)")
        ax.set_title("Training curves")
        ax.legend(fontsize=7, loc="upper right", ncol=2 if len(cells) > 7 else 1, frameon=False)
        return fig

    return make_plot("training_curves", "Training curves (loss vs tokens)", caption, draw)


def slot_usage(data: StudyData) -> Plot:
    caption = ("Memory slot usage over training for the memory families: fraction of value slots read "
               "at least once (left, higher = more of the memory in use) and the Gini coefficient of "
               "reads across slots (right, 0 = even use).")

    def draw():
        cells = [c for c in data.cells
                 if any(data.histories.get(c.run_id, {}).get(m) for m in ("slot_fraction_read", "slot_gini"))]
        if not cells:
            raise MissingData("no memory-layer cell logged slot usage (`slot_fraction_read`, `slot_gini`)")
        styles = _style(cells)
        fig, (left, right) = new_figure(2, width=5.6, height=4.2)
        tokens = _draw_metric(left, data, cells, "slot_fraction_read", styles)
        _draw_metric(right, data, cells, "slot_gini", styles)
        for ax in (left, right):
            _x_axis(ax, tokens)
            ax.set_ylim(-0.02, 1.02)
        left.set_ylabel("fraction of slots read (0–1)")
        left.set_title("Slots read so far")
        right.set_ylabel("Gini coefficient of slot reads (0–1)")
        right.set_title("Unevenness of slot use")
        left.legend(fontsize=7, loc="lower right", frameon=False)
        return fig

    return make_plot("slot_usage", "Memory slot usage over training", caption, draw)
