"""What every figure of the report shares: the `Plot` record, one style, and the PNG writer.

Each figure function takes the study's data (and fitted laws) and returns a `Plot`: PNG bytes, or
a note saying what the study lacks for that figure (one compute value, no memory cells, no slot
metrics, ...). A figure never raises for missing data; the report shows the note instead.
Matplotlib runs on the Agg backend (no display). Families keep one colour everywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

FAMILY_COLORS = {"dense": "#444444", "moe": "#d9822b", "pkm": "#3a9b5c", "memory_plus": "#2b6cd9",
                 "peer": "#8a4fbf"}
FAMILY_LABELS = {"dense": "dense", "moe": "MoE", "pkm": "PKM", "memory_plus": "Memory+", "peer": "PEER"}


@dataclass
class Plot:
    key: str                    # file stem: `<key>.png`
    title: str
    caption: str                # what the figure shows, one or two sentences
    png: bytes | None = None
    note: str | None = None     # why there is no figure
    notes: list[str] = field(default_factory=list)  # what the figure leaves out, and why

    @property
    def ok(self) -> bool:
        return self.png is not None


class MissingData(Exception):
    """Raised inside a figure function when the study lacks what the figure needs."""


def family_color(family: str) -> str:
    return FAMILY_COLORS.get(family, "#8a4fbf")


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def new_figure(n_panels: int = 1, width: float = 6.4, height: float = 4.2):
    """A figure with `n_panels` side by side, styled for the report."""
    import matplotlib  # deferred: matplotlib is heavy and only this path needs it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only this path needs it

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels if n_panels > 1 else width, height),
                             squeeze=False, constrained_layout=True)
    for ax in axes[0]:
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes[0])


def short_number(value: float) -> str:
    """3e+08 -> '3e8', 0.25 -> '0.25': compact numbers for notes and labels."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def tidy_log_axis(axis, low: float, high: float) -> None:
    """A log axis spanning less than a decade gets ~6 evenly spaced ticks with plain labels (as many
    digits as the spacing needs) and no minor labels; matplotlib would otherwise label minor ticks
    in scientific notation, or label nothing at all."""
    from matplotlib.ticker import (  # deferred: matplotlib is heavy and only this path needs it
        MaxNLocator,
        NullFormatter,
        ScalarFormatter,
    )

    if low > 0 and high / low < 10:
        axis.set_major_locator(MaxNLocator(nbins=6))
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_powerlimits((-3, 5))
        axis.set_major_formatter(formatter)
        axis.set_minor_formatter(NullFormatter())


def to_png(fig, dpi: int = 110) -> bytes:
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only this path needs it

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def make_plot(key: str, title: str, caption: str, draw: Callable[[], object],
              notes: list[str] | None = None) -> Plot:
    """Run `draw` (returns a matplotlib figure); MissingData becomes the plot's note.

    `notes` is the list `draw` appends to (curves it had to leave out, and why).
    """
    import matplotlib.pyplot as plt  # deferred: matplotlib is heavy and only this path needs it

    try:
        fig = draw()
    except MissingData as missing:
        plt.close("all")
        return Plot(key, title, caption, note=str(missing))
    return Plot(key, title, caption, png=to_png(fig), notes=list(notes or []))
