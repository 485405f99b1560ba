"""Gantt chart of a simulated iteration: one row per (group, stream), one bar per task (matplotlib, Agg)."""

from __future__ import annotations

import os

from .simulator import COMBINE, COMPUTE, DISPATCH, SimResult

_COLOURS = {
    "attn_f": "#4C72B0", "attn_b": "#8FAADC", "head_f": "#2F4B7C", "head_b": "#6A7FA8",
    "exp_f": "#DD8452", "exp_b": "#F3B98D", "xexp_f": "#C44E52", "xexp_b": "#E8A0A2",
    "dispatch_f": "#55A868", "dispatch_b": "#A6D5A6", "combine_f": "#8172B3", "combine_b": "#C3B9E0",
}
_LEGEND = {
    "attn_f": "attention fwd", "attn_b": "attention bwd (+recompute)", "head_f": "head+loss fwd",
    "head_b": "head bwd", "exp_f": "experts fwd", "exp_b": "experts bwd (+recompute)",
    "xexp_f": "Asym-EA experts fwd", "xexp_b": "Asym-EA experts bwd", "dispatch_f": "dispatch",
    "dispatch_b": "dispatch bwd", "combine_f": "combine", "combine_b": "combine bwd",
}


def draw_gantt(sim: SimResult, path: str | os.PathLike, *, title: str = "",
               labels: dict[str, str] | None = None) -> str:
    """Write a PNG of `sim` to `path` and return the path. `labels` renames groups (e.g. attn -> 6xA40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = labels or {}
    groups = list(sim.groups)
    rows = [(g, s) for g in groups for s in (COMPUTE, DISPATCH, COMBINE)]
    index = {row: i for i, row in enumerate(rows)}
    scale, unit = (1e3, "ms") if sim.makespan < 10 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.45 * len(rows)))
    used: set[str] = set()
    for task in sim.graph.tasks:
        t0, t1 = sim.start[task.id] * scale, sim.end[task.id] * scale
        for g in task.groups:
            y = len(rows) - 1 - index[(g, task.stream)]
            ax.broken_barh([(t0, max(t1 - t0, 1e-9))], (y - 0.4, 0.8), facecolors=_COLOURS.get(task.kind, "grey"),
                           edgecolor="white", linewidth=0.3)
            used.add(task.kind)
            if task.stream == COMPUTE and (t1 - t0) > sim.makespan * scale / 60:
                ax.text((t0 + t1) / 2, y, f"{task.layer},{task.microbatch}", ha="center", va="center", fontsize=6,
                        color="white")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{labels.get(g, g)} {s}" for g, s in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"time ({unit}); bar labels: stage, micro-batch")
    ax.set_xlim(0, sim.makespan * scale * 1.01)
    if title:
        ax.set_title(title, fontsize=10)
    handles = [Patch(color=_COLOURS[k], label=_LEGEND[k]) for k in _COLOURS if k in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=6, fontsize=7, frameon=False)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
