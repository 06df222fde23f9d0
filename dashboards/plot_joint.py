"""The joint law's figures: the fitted surface L(N, M) and the compute-optimal frontier.

Drawn from a joint.json (`memlayers fit --law joint`; a study's `<workdir>/laws/joint.json`),
with its chosen form. The surface is drawn at D = 20·N tokens (Chinchilla's rule of thumb, so
each model size is near compute-optimal), for N and M from a third of the smallest to three
times the largest fitted size. The frontier is `plan.frontier` for FRONTIER_GPUS GPUs of
FRONTIER_MEMORY bytes around the compute of the law's reference size at 20 tokens per
parameter: N, M, D and the loss against C, with the dense optimum's loss beside it. A study
without a joint law gets no figures (the report is unchanged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memlayers.dashboards.figure import MissingData, Plot, family_color, make_plot, new_figure
from memlayers.platform.laws.joint import load_joint
from memlayers.platform.laws.joint import predict as joint_predict
from memlayers.platform.laws.plan import Constraints, frontier

FRONTIER_GPUS = 8
FRONTIER_MEMORY = 80e9
TOKENS_PER_PARAM = 20.0


def _memory_fitted(law: dict) -> dict:
    entry = law["forms"][law["chosen"]]
    if any(v is None for v in entry["params"].values()):
        raise MissingData("the joint law was fitted without memory rows: no surface in M")
    return entry


def surface(law: dict) -> Plot:
    def draw():
        entry = _memory_fitted(law)
        sizes, memories = np.array(law["model_sizes"]), np.array([m for m in law["memory_sizes"] if m > 0])
        n = np.geomspace(sizes.min() / 3, sizes.max() * 3, 80)
        m = np.geomspace(memories.min() / 3, memories.max() * 3, 80)
        nn, mm = np.meshgrid(n, m, indexing="ij")
        loss = joint_predict(entry, law, nn, mm, TOKENS_PER_PARAM * nn)
        fig, (ax_map, ax_lines) = new_figure(2, width=5.6)
        contour = ax_map.contourf(nn, mm, loss, levels=14, cmap="viridis")
        fig.colorbar(contour, ax=ax_map, label="predicted loss")
        ax_map.set(xscale="log", yscale="log", xlabel="active parameters N", ylabel="memory parameters M",
                   title=f"L(N, M, D = {TOKENS_PER_PARAM:g}·N), form {law['chosen']}")
        for size in sizes:
            ax_lines.plot(m, joint_predict(entry, law, size, m, TOKENS_PER_PARAM * size), label=f"N = {size:.3g}")
            dense = joint_predict(entry, law, size, 0.0, TOKENS_PER_PARAM * size)
            ax_lines.axhline(float(dense), color="#999999", lw=0.6, ls=":")
        ax_lines.set(xscale="log", xlabel="memory parameters M", ylabel="predicted loss",
                     title="per model size (dotted: M = 0)")
        ax_lines.legend(fontsize=7)
        return fig

    return make_plot("joint_surface", "Joint law: the fitted surface",
                     f"The chosen form's loss over model and memory size at {TOKENS_PER_PARAM:g} tokens per "
                     "parameter; right, one curve per fitted model size against its dense loss.", draw)


def frontier_plot(law: dict) -> Plot:
    def draw():
        _memory_fitted(law)
        centre = 6.0 * law["n_ref"] * TOKENS_PER_PARAM * law["n_ref"]
        rows = [r for r in frontier(law, centre, Constraints(FRONTIER_MEMORY, FRONTIER_GPUS)) if "loss" in r]
        if not rows:
            raise MissingData("no feasible plan around the law's compute")
        c = np.array([r["compute"] for r in rows])
        fig, (ax_sizes, ax_loss) = new_figure(2, width=5.2)
        for key, label in (("n", "N (active)"), ("m", "M (memory)"), ("d", "D (tokens)")):
            ax_sizes.plot(c, [r[key] for r in rows], marker="o", ms=3, label=label)
        ax_sizes.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="optimal size",
                     title=f"compute-optimal plan, {FRONTIER_GPUS} x {FRONTIER_MEMORY / 1e9:g} GB")
        ax_sizes.legend(fontsize=8)
        ax_loss.plot(c, [r["loss"] for r in rows], marker="o", ms=3, color=family_color("memory_plus"),
                     label="with memory")
        ax_loss.plot(c, [r["dense_loss"] for r in rows], marker="o", ms=3, color=family_color("dense"),
                     label="dense")
        ax_loss.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="predicted loss at the optimum")
        ax_loss.legend(fontsize=8)
        return fig

    return make_plot("joint_frontier", "Joint law: the compute-optimal frontier",
                     "The (N, M, D) that minimise the chosen form's loss at each budget within the GPU memory "
                     "(memlayers plan), and the loss there against the dense optimum's.", draw)


def joint_plots(workdir: Path | str) -> list[Plot]:
    """The two figures when the study has a readable `laws/joint.json`, else none."""
    path = Path(workdir) / "laws" / "joint.json"
    if not path.is_file():
        return []
    try:
        law = load_joint(path)
    except ValueError as error:
        return [Plot("joint_surface", "Joint law", "", note=str(error))]
    return [surface(law), frontier_plot(law)]
