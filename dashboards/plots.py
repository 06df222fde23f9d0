"""Every figure of the report, in the order the report shows them (`all_plots`).

The figure modules each draw one kind of figure on the shared style of `figure.py`; this module
only lists them, so it sits above them and none of them imports it.
"""

from __future__ import annotations

from memlayers.dashboards import plot_memory, plot_scaling, plot_training
from memlayers.dashboards.figure import Plot
from memlayers.dashboards.laws_view import StudyLaws
from memlayers.dashboards.study_data import StudyData


def all_plots(data: StudyData, laws: StudyLaws) -> list[Plot]:
    """Every figure of the report, headline first."""
    return [
        plot_scaling.loss_vs_compute(data, laws),
        plot_memory.metrics_vs_memory(data, laws),
        plot_memory.factual_qa_vs_memory(data, laws),
        plot_scaling.compute_multipliers(data, laws),
        plot_training.training_curves(data),
        plot_training.slot_usage(data),
    ]
