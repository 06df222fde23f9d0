"""The continual-learning figure of a finetuning study: learning new facts against forgetting old ones.

Left: old-fact recall against new-fact recall, one curve per (method, source family) through its
evaluations (the first point is the source model), the line the mean over seeds and the band the
seeds' range of old-fact recall. Right: value rows changed by the memory methods, and how many of
them the old facts read at their answer position. `continual_table` is the same data as rows of
final numbers (mean and range over seeds) for a results file. Studies without finetuning cells
get no figure (`continual_plots` returns none).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from memlayers.dashboards.figure import MissingData, Plot, family_color, family_label, make_plot, new_figure
from memlayers.dashboards.study_data import Cell, StudyData, load_histories
from memlayers.platform.tracking.client import client_for

METHOD_STYLES = {"full": "o-", "lora": "s--", "memory": "^-.", "sparse_memory": "D:"}
CURVES = ("new_qa_exact_match", "old_qa_exact_match")
COLUMNS = ("new_qa_exact_match", "old_qa_exact_match", "forgetting", "val_loss", "slots_changed", "slots_changed_old")


def _groups(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    groups: dict[tuple[str, str], list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.tags.get("method"):
            groups[(cell.tags["method"], cell.family)].append(cell)
    return dict(sorted(groups.items()))


def _trajectory(histories: dict, cell: Cell) -> np.ndarray:
    """(points, 2): (new recall, old recall) at the source and at every evaluation."""
    runs = histories.get(cell.run_id, {})
    new, old = (dict(runs.get(key, [])) for key in CURVES)
    steps = sorted(set(new) & set(old))
    start = [tuple(cell.metrics.get(f"{key}_source", np.nan) for key in CURVES)]
    return np.array(start + [(new[s], old[s]) for s in steps])


def _draw(data: StudyData, groups: dict, histories: dict):
    fig, (ax, bars) = new_figure(2)
    for (method, family), cells in groups.items():
        paths = [_trajectory(histories, c) for c in cells]
        n = min(len(p) for p in paths)
        stacked = np.stack([p[:n] for p in paths])          # seeds x points x (new, old)
        x = stacked[:, :, 0].mean(axis=0)
        ax.plot(x, stacked[:, :, 1].mean(axis=0), METHOD_STYLES.get(method, "o-"), color=family_color(family),
                label=f"{method} ({family_label(family)})", markersize=4)
        ax.fill_between(x, stacked[:, :, 1].min(axis=0), stacked[:, :, 1].max(axis=0), color=family_color(family),
                        alpha=0.15)
    ax.set_xlabel("new-fact recall (exact match)")
    ax.set_ylabel("old-fact recall (exact match)")
    ax.set_title("Learning vs forgetting")
    ax.legend(fontsize=7)
    memory = [(key, cells) for key, cells in groups.items() if "slots_changed" in cells[0].metrics]
    for i, ((_, family), cells) in enumerate(memory):
        for j, key in enumerate(("slots_changed", "slots_changed_old")):
            values = [c.metrics[key] for c in cells]
            bars.bar(i + 0.4 * j, np.mean(values), width=0.4, color=family_color(family), alpha=1.0 - 0.5 * j,
                     yerr=[[np.mean(values) - min(values)], [max(values) - np.mean(values)]],
                     label=("all changed rows", "rows the old facts read")[j] if i == 0 else None)
    bars.set_xticks([i + 0.2 for i in range(len(memory))], [f"{m}\n{family_label(f)}" for (m, f), _ in memory],
                    fontsize=7)
    bars.set_ylabel("value rows changed")
    bars.set_title("Slots changed")
    if memory:
        bars.legend(fontsize=7)
    return fig


def continual_plots(data: StudyData) -> list[Plot]:
    """The learning-vs-forgetting figure of a study with finetuning cells; [] otherwise."""
    groups = _groups(data.finished_cells())
    if not groups:
        return []
    histories = load_histories(client_for(data.ref.tracking_uri), [c for cells in groups.values() for c in cells],
                               CURVES)

    def draw():
        if not any(histories.values()):
            raise MissingData("the finetuning cells logged no evaluations")
        return _draw(data, groups, histories)

    return [make_plot("continual", "Learning vs forgetting",
                      "Old-fact recall against new-fact recall through finetuning, per method (first point: the "
                      "source model; line: mean over seeds; band: the seeds' range). Right: value rows changed, "
                      "and those of them the old facts read (mean, bars the seeds' range).", draw)]


def continual_table(data: StudyData) -> list[str]:
    """Markdown rows: method, source family, seeds, then each of COLUMNS as mean [min, max] over seeds."""
    rows = ["| method | source | seeds | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (3 + len(COLUMNS))]
    for (method, family), cells in _groups(data.finished_cells()).items():
        parts = []
        for key in COLUMNS:
            values = [c.metrics[key] for c in cells if key in c.metrics]
            parts.append(f"{np.mean(values):.3g} [{min(values):.3g}, {max(values):.3g}]" if values else "-")
        rows.append(f"| {method} | {family_label(family)} | {len(cells)} | " + " | ".join(parts) + " |")
    return rows
