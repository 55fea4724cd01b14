"""The flywheel's report: one self-contained HTML file (plots inlined) and a markdown summary.

It reads only what the stages wrote (the flywheel state and each stage's files), so it can be
rebuilt at any time; `alignloop report RUN` prints where a run is without rebuilding anything.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from alignloop.runs import atomic_path, atomic_write_text


def img(path: str | Path | None) -> str:
    if not path or not Path(path).is_file():
        return "<p><em>(plot missing)</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(metrics: Path, out: Path, title: str, keys: tuple[str, ...] = ("loss", "eval_loss")) -> Path | None:
    """Curves of `keys` over steps from a stage's metrics.jsonl; None when there is nothing to plot."""
    rows = [r for r in _read_jsonl(metrics) if "step" in r]
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None, label=k)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def _turn_sections(turn: dict, folder: Path) -> tuple[list[str], list[str]]:
    """(html parts, markdown lines) for one turn."""
    n = turn["turn"]
    s = turn["summaries"]
    parts = [f"<h2>Turn {n}</h2><p>deployed: <code>{html.escape(turn['deployed'])}</code> &rarr; "
             f"new: <code>{html.escape(turn['model'])}</code></p>"]
    md = [f"## Turn {n}", "", f"- deployed: `{turn['deployed']}`, new: `{turn['model']}`"]

    if "filter" in s:
        f = s["filter"]
        parts.append("<h3>Filter funnel</h3>" + img(f.get("funnel_png")))
        pr = f.get("precision_recall") or {}
        if pr:
            parts.append(_table(["filter", "precision", "recall"],
                                [[k, v.get("precision"), v.get("recall")] for k, v in pr.items()]))
            md += [f"- filter {k}: precision {_fmt(v.get('precision'))}, recall {_fmt(v.get('recall'))}"
                   for k, v in pr.items()]
    if "build" in s and s["build"].get("datasets"):
        rows = [[k, v.get("rows")] for k, v in s["build"]["datasets"].items()]
        parts.append("<h3>Datasets</h3>" + _table(["dataset", "rows"], rows))
    if "sft" in s:
        png = plot_training_curves(Path(s["sft"]["metrics"]), folder / f"turn-{n}" / "sft_loss.png", "SFT loss")
        parts.append("<h3>SFT</h3>" + img(png))
        last = (s["sft"].get("train") or {})
        md.append(f"- SFT: {_fmt(last.get('steps'))} steps, final loss {_fmt(last.get('loss'))}")
    for extra in ("rm", "rl"):
        if extra in s and s[extra].get("html"):
            parts.append(s[extra]["html"])
            md += s[extra].get("markdown", [])
    if "eval" in s:
        e = s["eval"]
        names = [k for k in ("deployed", "new") if k in e]
        keys = ["gt_engagement", "gt_quality"]
        rows = [[k, *[e[m][k] for m in names]] for k in keys]
        rules = sorted(set().union(*(e[m]["rules"] for m in names)) - {"n"})
        rows += [[f"rule: {k}", *[e[m]["rules"].get(k) for m in names]] for k in rules]
        if all("judge" in e[m] for m in names):
            dims = sorted(e[names[0]]["judge"])
            rows += [[f"judge: {d}", *[e[m]["judge"][d]["mean"] for m in names]] for d in dims]
        parts.append(f"<h3>Offline evaluation ({e['prompts']} held-out prompts, {e['users']} users)</h3>"
                     + _table(["metric", *names], rows))
        d = e.get("new_vs_deployed", {})
        paired_text = (f"; paired diff {d['diff_mean']:+.4f} [{d['diff_lo']:+.4f}, {d['diff_hi']:+.4f}], p={d['p_value']:.3g}"
                       if d else "")
        md.append(f"- offline ground-truth engagement: deployed {_fmt(e['deployed']['gt_engagement'])}, "
                  f"new {_fmt(e['new']['gt_engagement'])} ({e['prompts']} held-out prompts{paired_text})")
        if d:
            parts.append(f"<p>new minus deployed, paired over prompts: {d['diff_mean']:+.4f} "
                         f"(95% CI [{d['diff_lo']:+.4f}, {d['diff_hi']:+.4f}], p = {d['p_value']:.3g})</p>")
    if "abtest" in s:
        a = s["abtest"]
        rows = [[k, c["control"], c["treatment"], c["diff"], f"[{c['ci_low']:.4g}, {c['ci_high']:.4g}]", c["p_value"]]
                for k, c in a["comparisons"].items()]
        verdict = "LAUNCH" if a["decision"]["launch"] else "DO NOT LAUNCH"
        parts.append("<h3>A/B test (fresh users)</h3>" + img(a.get("plot"))
                     + _table(["metric", "control", "treatment", "diff", "95% CI", "p"], rows)
                     + f"<p>users exposed: {html.escape(json.dumps(a['exposed']))}; sample-ratio p = "
                       f"{_fmt(a['srm_p_value'])}; unsafe rate: {html.escape(json.dumps(a['unsafe_rate']))}</p>"
                     + f"<p class='decision {'go' if a['decision']['launch'] else 'stop'}'>Decision: {verdict}</p><ul>"
                     + "".join(f"<li>{html.escape(r)}</li>" for r in a["decision"]["reasons"]) + "</ul>")
        md.append(f"- A/B decision: **{verdict}** — " + "; ".join(a["decision"]["reasons"]))
        gt = a["comparisons"].get("gt_engagement")
        if gt:
            md.append(f"- A/B ground-truth engagement: {_fmt(gt['control'])} -> {_fmt(gt['treatment'])} "
                      f"(diff {gt['diff']:+.4f}, 95% CI [{gt['ci_low']:+.4f}, {gt['ci_high']:+.4f}], p={gt['p_value']:.3g})")
    if "launched" in turn:
        verdict = "LAUNCH" if turn["launched"] else "DO NOT LAUNCH"
        parts.append(f"<h3>Turn {n} decision</h3><p class='decision {'go' if turn['launched'] else 'stop'}'>"
                     f"{verdict}</p><ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in turn.get("why", []))
                     + "</ul>")
        md.append(f"- turn decision: **{verdict}** — " + "; ".join(turn.get("why", [])))
    return parts, md


_STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}.go{color:#070;font-weight:bold}
.stop{color:#b00;font-weight:bold}code{background:#f4f4f4}"""


def write_report(state: dict, folder: Path) -> dict[str, Path]:
    """report.html and report.md in the run folder; returns their paths."""
    parts = [f"<h1>alignloop flywheel: {html.escape(state['run'])}</h1>"]
    md = [f"# alignloop flywheel: {state['run']}", ""]
    timing_rows = [[t["turn"], t["stage"], t["seconds"]] for t in state["timings"]]
    total = sum(t["seconds"] for t in state["timings"])
    parts.append(f"<p>{len(state['turns'])} turn(s); stages: {', '.join(state['stages'])}; "
                 f"deployed at the end: <code>{html.escape(state['deployed_at_end'])}</code></p>")
    parts.append("<h2>Stage timings</h2>" + _table(["turn", "stage", "seconds"], timing_rows + [["", "total", total]]))
    md += [f"- turns: {len(state['turns'])}; deployed at the end: `{state['deployed_at_end']}`",
           f"- stage seconds: " + ", ".join(f"{t['stage']} {t['seconds']:.0f}" for t in state["timings"]), ""]
    for turn in state["turns"]:
        p, m = _turn_sections(turn, folder)
        parts += p
        md += m + [""]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>alignloop {html.escape(state['run'])}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = {"html": folder / "report.html", "markdown": folder / "report.md"}
    atomic_write_text(out["html"], page)
    atomic_write_text(out["markdown"], "\n".join(md) + "\n")
    return out


def where_is(folder: Path) -> list[dict]:
    """Every stage folder of a run with whether it finished and how long it took (from manifests)."""
    from alignloop.flywheel.recipe import STAGES

    def order(p: Path) -> int:
        return STAGES.index(p.name) if p.name in STAGES else len(STAGES)

    rows = []
    for turn_dir in sorted(folder.glob("turn-*"), key=lambda p: int(p.name.split("-")[1])):
        for stage_dir in sorted((p for p in turn_dir.iterdir() if p.is_dir()), key=order):
            manifest = stage_dir / "manifest.json"
            done = manifest.is_file()
            seconds = json.loads(manifest.read_text()).get("seconds") if done else None
            rows.append({"turn": turn_dir.name, "stage": stage_dir.name, "done": done, "seconds": seconds})
    return rows
