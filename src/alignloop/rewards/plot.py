"""One figure of reward-model metrics on held-out users, for the report: each head's primary metric
next to its baseline, the simulator's ceiling and (where measured) the text+activity shortcut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.runs import atomic_path


def plot_rm_metrics(report: dict[str, Any], path: Path) -> Path:
    import matplotlib  # plots only: the eval stage imports this module whether it plots or not

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(report)
    series = {"baseline": [], "head": [], "text+activity": [], "ceiling": []}
    for h in heads:
        p = report[h]["primary"]
        series["baseline"].append(p["baseline"])
        series["head"].append(p["value"])
        series["text+activity"].append(report[h].get("shortcut", {}).get("text+activity", float("nan")))
        series["ceiling"].append(report[h].get("ceiling", {}).get(p["metric"], float("nan")))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(heads)), 4))
    width = 0.2
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - 1.5) * width for x in range(len(heads))], [v if v is not None else float("nan") for v in values],
               width, label=name)
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([f"{h}\n{report[h]['primary']['metric']}" for h in heads], fontsize=8)
    ax.set_title("reward heads on held-out users")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
