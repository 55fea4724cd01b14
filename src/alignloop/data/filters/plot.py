"""The funnel plot: rows left after each filter, and what each filter dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignloop.data.filters.report import FunnelReport


def funnel_plot(report: FunnelReport, path: str | Path) -> Path:
    """A PNG funnel: rows left in each log table after each filter, with what each filter dropped."""
    # matplotlib serves this plot only: loaded on first use, the file backend chosen before pyplot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    tables = ["users", "conversations", "turns", "events"]
    stages = ["input"] + [f.name for f in report.filters]
    counts = {t: [report.input_rows.get(t, 0)] + [f.rows_after.get(t, 0) for f in report.filters] for t in tables}
    fig, axes = plt.subplots(1, len(tables) + 1, figsize=(4.2 * (len(tables) + 1), 0.55 * len(stages) + 2.2),
                             sharey=True)
    y = np.arange(len(stages))[::-1]
    for ax, t in zip(axes, tables):
        values = counts[t]
        top = max(values) or 1
        ax.barh(y, values, color="#4C72B0", alpha=0.85)
        for yi, v, prev in zip(y, values, [values[0]] + values[:-1]):
            lost = prev - v
            ax.text(v + top * 0.01, yi, f"{v:,}" + (f"  (-{lost:,})" if lost else ""), va="center", fontsize=8)
        ax.set_title(t)
        ax.set_xlim(0, top * 1.45)
        ax.tick_params(axis="x", labelsize=7)
    ax = axes[-1]
    for yi, f in zip(y[1:], report.filters):
        share = 100.0 * f.dropped / f.input if f.input else 0.0
        weighted = 100.0 * f.weighted / f.input if f.input else 0.0
        ax.barh(yi, share, color="#C44E52", alpha=0.85)
        if weighted:
            ax.barh(yi, weighted, left=share, color="#DD8452", alpha=0.85)
        top_reasons = sorted(f.reasons.items(), key=lambda kv: -kv[1])[:2]
        note = f"{f.dropped + f.weighted:,} of {f.input:,} {f.unit}: " + "; ".join(f"{k} {v}" for k, v in top_reasons)
        ax.text(1, yi - 0.36, note[:70], fontsize=7, va="center")
    ax.set_xlim(0, 100)
    ax.set_title("% of its items each filter dropped (red)\nor down-weighted (orange)", fontsize=9)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([f"{s}" + (f" [{f.unit}]" if i else "") for i, (s, f) in
                             enumerate(zip(stages, [None] + report.filters))])
    fig.suptitle("log filter funnel", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
