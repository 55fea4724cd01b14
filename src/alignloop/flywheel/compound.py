"""Across turns: does the loop compound? Each turn's ground truth, A/B decision and multi-turn KPIs side by side.

Ground truth per turn is the offline eval's (`alignloop.eval.offline`): every turn asks the same
held-out users (eval.users: one seed for the whole run) with the same sampling seeds, so turn n's
number and turn m's are measured on the same prompts, with a 95% interval over users. Turn 0 is the
model deployed before the first turn. The A/B decision beside it is made on observable KPIs only;
the A/B's own ground-truth difference is printed next to it, never an input to it.

Everything here reads the flywheel state (`run_flywheel`'s turns and timings) and returns numbers,
rows and lines; `alignloop.flywheel.report` renders them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.runs import atomic_path

MULTI_TURN = ("turns_per_session", "continue_rate", "return_1d")
"""The A/B's multi-turn KPIs (per user: messages per session, share of answers replied to, share
followed by a new session within a day), in the order the report shows them."""


def ground_truth_points(state: dict) -> list[dict[str, Any]]:
    """One point per model on the held-out users: turn 0 (deployed before turn 1), then each turn's new
    model, with its 95% interval (None where an older eval.json has none) and whether it was launched.
    Turns without a simulated offline eval (real logs, eval skipped) have no point."""
    points: list[dict[str, Any]] = []
    for turn in state["turns"]:
        e = turn["summaries"].get("eval")
        if not e or e.get("kind") == "logs" or "new" not in e:
            continue
        if not points:
            points.append(_point(0, e["deployed"], launched=True, model=turn["deployed"]))
        points.append(_point(turn["turn"], e["new"], launched=bool(turn.get("launched")), model=turn["model"]))
    return points


def _point(turn: int, scores: dict, launched: bool, model: str) -> dict[str, Any]:
    ci = scores.get("gt_engagement_ci") or {}
    return {"turn": turn, "gt": scores["gt_engagement"], "lo": ci.get("lo"), "hi": ci.get("hi"), "n": ci.get("n"),
            "launched": launched, "model": model}


def deployed_path(points: list[dict[str, Any]]) -> list[float]:
    """Ground truth of the model deployed after each point's turn: a launch moves it, a refusal keeps the last."""
    level, path = None, []
    for p in points:
        if p["launched"] or level is None:
            level = p["gt"]
        path.append(level)
    return path


def plot_ground_truth(state: dict, out: Path) -> Path | None:
    """Each turn's model's ground truth with its 95% interval (filled: launched; hollow: not), and the
    deployed model's as a step line; None when no turn has a simulated offline eval."""
    points = ground_truth_points(state)
    if not points:
        return None
    import matplotlib  # plots only: importing the report stays light

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = [p["turn"] for p in points]
    ax.step(xs, deployed_path(points), where="post", color="#888", linestyle="--", label="deployed after the turn")
    for p in points:
        lo, hi = p["lo"], p["hi"]
        err = [[p["gt"] - lo], [hi - p["gt"]]] if lo is not None and hi is not None else None
        colour = "#1a7f37" if p["launched"] else "#c62828"
        ax.errorbar([p["turn"]], [p["gt"]], yerr=err, fmt="o", capsize=5, markersize=8, color=colour,
                    markerfacecolor=colour if p["launched"] else "white")
        ax.annotate(f"{p['gt']:+.3f}", (p["turn"], p["gt"]), textcoords="offset points", xytext=(10, -4), fontsize=8)
    ax.plot([], [], "o", color="#1a7f37", label="launched (turn 0: the base)")
    ax.plot([], [], "o", color="#c62828", markerfacecolor="white", label="not launched")
    ax.set_xticks(xs, ["0\nbase" if x == 0 else str(x) for x in xs])
    ax.set_xlabel("turn (its new model)")
    ax.set_ylabel("ground-truth engagement")
    n = next((p["n"] for p in points if p["n"]), None)
    ax.set_title("Held-out users' ground truth per turn" + (f" (95% CI over {n} users)" if n else ""))
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def turn_seconds(state: dict) -> dict[int, float]:
    """Wall seconds of each turn's stages together (the report's own time is no turn's)."""
    total: dict[int, float] = {}
    for t in state.get("timings", []):
        if t["turn"] is not None:
            total[t["turn"]] = total.get(t["turn"], 0.0) + t["seconds"]
    return total


DECISION_HEADER = ["turn", "A/B decision (observable KPIs)", "primary: diff [95% CI], p", "A/B ground truth: diff, p",
                   "offline ground truth: deployed -> new [95% CI]", "KPIs agree with truth", "launched", "minutes"]


def decision_rows(state: dict) -> list[list[Any]]:
    """One row per turn with an A/B test: its decision on KPIs, the ground truth beside it, the turn's outcome."""
    minutes = turn_seconds(state)
    rows = []
    for turn in state["turns"]:
        a = turn["summaries"].get("abtest")
        if not a:
            continue
        rows.append([turn["turn"], "LAUNCH" if a["decision"]["launch"] else "DO NOT LAUNCH", _primary(a),
                     _ab_truth(a), _offline_truth(turn["summaries"].get("eval")),
                     _agrees(a), "yes" if turn.get("launched") else "no",
                     f"{minutes.get(turn['turn'], 0.0) / 60:.1f}"])
    return rows


def _primary(a: dict) -> str:
    name = a["decision"].get("primary", "")
    c = a["comparisons"].get(name)
    if not c:
        return f"{name}: not measured"
    return f"{name} {c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], p={c['p_value']:.2g}"


def _ab_truth(a: dict) -> str:
    t = a.get("ground_truth")
    return f"{t['diff']:+.4f}, p={t['p_value']:.2g}" if t else ""


def _agrees(a: dict) -> str:
    t = a.get("ground_truth")
    return "" if not t else ("yes" if t["agrees"] else "no")


def _offline_truth(e: dict | None) -> str:
    if not e or e.get("kind") == "logs" or "new" not in e:
        return ""
    ci = e["new"].get("gt_engagement_ci")
    interval = f" [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" if ci else ""
    return f"{e['deployed']['gt_engagement']:+.3f} -> {e['new']['gt_engagement']:+.3f}{interval}"


MULTI_TURN_HEADER = ["turn", *[f"{m}: control -> treatment (diff, p)" for m in MULTI_TURN]]


def multiturn_rows(state: dict) -> list[list[Any]]:
    """One row per turn with an A/B test: its multi-turn KPIs, control (deployed) and treatment (new)."""
    rows = []
    for turn in state["turns"]:
        a = turn["summaries"].get("abtest")
        if a:
            rows.append([turn["turn"], *[_kpi(a["comparisons"].get(m)) for m in MULTI_TURN]])
    return rows


def _kpi(c: dict | None) -> str:
    if not c:
        return "not measured"
    return f"{c['control']:.3f} -> {c['treatment']:.3f} ({c['diff']:+.3f}, p={c['p_value']:.2g})"


def turn_lines(state: dict) -> list[str]:
    """Per turn, one line each: the ground truth of its new model on the held-out users, its A/B decision
    on KPIs (with the A/B's ground truth beside it), and its multi-turn KPIs (printed after the flywheel)."""
    points = {p["turn"]: p for p in ground_truth_points(state)}
    lines = []
    if 0 in points:
        lines.append(f"turn 0 (base {points[0]['model']}): ground truth {_gt(points[0])}")
    decisions = {r[0]: r for r in decision_rows(state)}
    kpis = {r[0]: r for r in multiturn_rows(state)}
    for turn in state["turns"]:
        n = turn["turn"]
        if n in points:
            outcome = "launched" if turn.get("launched") else "not launched"
            lines.append(f"turn {n}: ground truth {_gt(points[n])} ({outcome})")
        if n in decisions:
            _, decision, primary, truth, _, agrees, _, _ = decisions[n]
            lines.append(f"turn {n}: A/B {decision} on {primary}; A/B ground truth {truth}; agrees: {agrees}")
        if n in kpis:
            lines.append(f"turn {n}: multi-turn " + "; ".join(f"{m} {v}" for m, v in zip(MULTI_TURN, kpis[n][1:])))
    return lines


def _gt(p: dict) -> str:
    interval = f" [{p['lo']:+.3f}, {p['hi']:+.3f}]" if p["lo"] is not None else ""
    return f"{p['gt']:+.3f}{interval} on {p['n'] or '?'} held-out users"
