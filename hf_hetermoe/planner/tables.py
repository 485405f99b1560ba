"""Plain-text tables of strategy results (shared by `hetermoe plan`, `hetermoe simulate` and the report)."""

from __future__ import annotations

from .lower_bound import LowerBound
from .strategies import EP, TABLE_ORDER, StrategyResult
from .workload import Setup


def _fmt_tokens(x: float) -> str:
    return f"{x / 1e3:,.1f}k"


def results_table(setup: Setup, results: dict[str, StrategyResult], bound: LowerBound,
                  problems: dict[str, str] | None = None, chosen: str | None = None) -> str:
    problems = problems or {}
    labels = list(setup.cluster.labels)
    header = ["strategy", "R", "iter (s)", "tokens/s", "vs EP", "of bound"] + [f"util {x}" for x in labels] + \
        [f"bubble {x} (s)" for x in labels]
    rows = []
    ep = results.get(EP)
    for name in TABLE_ORDER:
        if name not in results:
            if name in problems:
                rows.append([name, "-", "-", "-", "-", "-"] + ["-"] * (2 * len(labels)))
            continue
        r = results[name]
        mark = " *" if name == chosen else ""
        rows.append(
            [name + mark, str(r.microbatches) if name != "EP(Ideal)" else "-", f"{r.iteration_s:.3f}",
             _fmt_tokens(r.tokens_per_s), f"{ep.iteration_s / r.iteration_s:.2f}x" if ep else "-",
             f"{bound.iteration_s / r.iteration_s:.0%}"]
            + [f"{r.utilisation[x]:.0%}" if x in r.utilisation else "-" for x in labels]
            + [f"{r.bubble_s[x]:.3f}" if x in r.bubble_s else "-" for x in labels]
        )
    rows.append(["lower bound", "-", f"{bound.iteration_s:.3f}", _fmt_tokens(setup.tokens / bound.iteration_s), "-",
                 "100%"] + ["100%"] * len(labels) + ["0"] * len(labels))
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for name, why in problems.items():
        lines.append(f"{name}: not applicable: {why}")
    return "\n".join(lines)
