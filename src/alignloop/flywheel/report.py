"""The flywheel's report: one self-contained HTML file (plots inlined) and a markdown summary.

It reads only what the stages wrote (the flywheel state and each stage's files), so it can be
rebuilt at any time; `alignloop report RUN` prints where a run is without rebuilding anything.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alignloop.eval.abtest import verdict_lines
from alignloop.eval.offline import logs_eval_lines
from alignloop.flywheel import compound
from alignloop.flywheel.config import STAGES
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
    import matplotlib  # plots only: importing the report stays light

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


Fragment = tuple[list[str], list[str]]
"""(html parts, markdown lines) of one section of the report."""


def _ingest_section(i: dict, turn_dir: Path) -> Fragment:
    counts = i.get("counts") or {}
    rows = [[t, c.get("read"), c.get("ingested"), c.get("quarantined"), c.get("duplicates")] for t, c in counts.items()]
    src = i.get("sources") or {}
    what = ", ".join([*src.get("inputs", []), *(["the chitchat dataset"] if src.get("chitchat") else [])])
    line = f"ingested real logs from {what}: " + ", ".join(
        f"{c.get('ingested', 0):,} {t}" for t, c in counts.items()) + f"; {i.get('quarantine_total') or 0:,} quarantined"
    return (["<h3>Ingest (real logs)</h3>" + _table(["table", "read", "ingested", "quarantined", "duplicates"], rows)
             + f"<p>{html.escape(line)}</p>"], [f"- {line}"])


def _filter_section(f: dict, turn_dir: Path) -> Fragment:
    parts = ["<h3>Filter funnel</h3>" + img(f.get("funnel_png"))]
    pr = f.get("precision_recall") or {}
    if not pr:
        return parts, []
    parts.append(_table(["filter", "precision", "recall"],
                        [[k, v.get("precision"), v.get("recall")] for k, v in pr.items()]))
    return parts, [f"- filter {k}: precision {_fmt(v.get('precision'))}, recall {_fmt(v.get('recall'))}"
                   for k, v in pr.items()]


def _build_section(b: dict, turn_dir: Path) -> Fragment:
    if not b.get("datasets"):
        return [], []
    rows = [[k, v.get("rows")] for k, v in b["datasets"].items()]
    notes = b.get("notes") or []
    said = "".join(f"<li>{html.escape(n['line'])}</li>" for n in notes)
    return (["<h3>Datasets</h3>" + _table(["dataset", "rows"], rows) + (f"<ul>{said}</ul>" if said else "")],
            [f"- build: {n['line']}" for n in notes])


def _sft_section(sft: dict, turn_dir: Path) -> Fragment:
    png = plot_training_curves(Path(sft["metrics"]), turn_dir / "sft_loss.png", "SFT loss")
    last = sft.get("train") or {}
    return (["<h3>SFT</h3>" + img(png)],
            [f"- SFT: {_fmt(last.get('steps'))} steps, final loss {_fmt(last.get('loss'))}"])


def _preference_section(pref: dict, turn_dir: Path) -> Fragment:
    png = plot_training_curves(Path(pref["metrics"]), turn_dir / "preference_loss.png", f"{pref['loss']} loss")
    last = pref.get("train") or {}
    line = (f"- preference ({pref['loss']}): {_fmt(last.get('steps'))} steps, final loss {_fmt(last.get('loss'))}, "
            f"held-out accuracy {_fmt(last.get('eval_accuracy'))}")
    return [f"<h3>Preference optimisation ({html.escape(pref['loss'])})</h3>" + img(png)], [line]


def _rm_section(rm: dict, turn_dir: Path) -> Fragment:
    lines = rm.get("lines", [])
    plot = rm.get("plot")
    part = ("<h3>Reward models (held-out users)</h3>" + (img(plot) if plot and Path(plot).is_file() else "")
            + "<pre>" + "\n".join(html.escape(line) for line in lines) + "</pre>")
    return [part], [f"- {line}" for line in lines if "headline" in line]


def _rl_section(rl: dict, turn_dir: Path) -> Fragment:
    if rl.get("prompts"):
        return _rl_logs_section(rl, turn_dir)
    reward = rl.get("reward", "learned")
    title = "RL: learned reward vs ground truth" if reward == "learned" else f"RL: {reward} vs ground truth"
    if rl.get("env") == "multi_turn":
        title += " (multi-turn: simulated users write, the learned p(continue) keeps them)"
    plot = plot_training_curves(Path(rl["metrics"]), turn_dir / "rl_curves.png", title,
                                keys=("reward", "gt/engagement"))
    verdict = rl.get("reward_hacking", {})
    part = (f"<h3>{html.escape(title)}</h3>" + (img(plot) if plot else "")
            + f"<pre>{html.escape(json.dumps(verdict, indent=1))}</pre>")
    return [part], [f"- RL reward-hacking watch: {json.dumps(verdict)}"]


def _rl_logs_section(rl: dict, turn_dir: Path) -> Fragment:
    """RL on real logs' prompts: its reward curve alone (there is no ground truth to draw beside it)."""
    title = f"RL: {rl.get('reward', 'learned')} reward on train users' prompts"
    plot = plot_training_curves(Path(rl["metrics"]), turn_dir / "rl_curves.png", title, keys=("reward",))
    line = rl_reward_line(rl)
    return ([f"<h3>{html.escape(title)}</h3>" + (img(plot) if plot else "") + f"<p>{html.escape(line)}</p>"],
            [f"- {line}"])


def rl_reward_line(rl: dict) -> str:
    """RL's reward at its first and last step (on its training prompts)."""
    steps = [r for r in _read_jsonl(Path(rl["metrics"])) if isinstance(r.get("reward"), (int, float))]
    if not steps:
        return "RL: no steps logged"
    first, last = steps[0], steps[-1]
    return (f"RL: {rl.get('reward', 'learned')} reward {first['reward']:+.3f} at step {first['step']} -> "
            f"{last['reward']:+.3f} at step {last['step']} (mean over the step's samples, train users' prompts)")


def _logs_eval_section(e: dict, turn_dir: Path) -> Fragment:
    """Offline eval on real logs: learned reward, pairwise comparisons, rules and judge, per model."""
    names = [k for k in e["models"] if k in e]
    rows = []
    if all("reward" in e[m] for m in names):
        rows.append(["learned reward (per-user mean)", *[e[m]["reward"]["mean"] for m in names]])
        rows.append(["95% CI", *[f"[{e[m]['reward']['lo']:+.3f}, {e[m]['reward']['hi']:+.3f}]" for m in names]])
        comps = sorted(set().union(*(e[m]["reward"]["components"] for m in names)))
        rows += [[f"reward model {k.removeprefix('raw/')}", *[e[m]["reward"]["components"].get(k) for m in names]]
                 for k in comps]
    rows += _rule_and_judge_rows(e, names)
    parts = [f"<h3>Offline evaluation ({e['prompts']} held-out prompts of {e['users']} real users)</h3>"
             + _table(["metric", *[f"{m}" for m in names]], rows)]
    pairs = e.get("pairs") or {}
    if pairs:
        parts.append(_table(["learned reward", "diff", "95% CI", "p", "higher on"],
                            [[k.replace("_vs_", " - "), d["diff_mean"], f"[{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}]",
                              d["p_value"], f"{d['win_rate']:.0%}"] for k, d in pairs.items()]))
    lines = logs_eval_lines(e)
    parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    return parts, [f"- offline eval: {line}" for line in lines]


def _rule_and_judge_rows(e: dict, names: list[str]) -> list[list]:
    """One row per rule metric, and per judge dimension when every model was judged."""
    rules = sorted(set().union(*(e[m]["rules"] for m in names)) - {"n"})
    rows = [[f"rule: {k}", *[e[m]["rules"].get(k) for m in names]] for k in rules]
    if all("judge" in e[m] for m in names):
        dims = sorted(e[names[0]]["judge"])
        rows += [[f"judge: {d}", *[e[m]["judge"][d]["mean"] for m in names]] for d in dims]
    return rows


def _eval_section(e: dict, turn_dir: Path) -> Fragment:
    if e.get("kind") == "logs":
        return _logs_eval_section(e, turn_dir)
    names = [k for k in ("deployed", "new") if k in e]
    rows = [[k, *[e[m][k] for m in names]] for k in ("gt_engagement", "gt_quality")]
    rows += _rule_and_judge_rows(e, names)
    parts = [f"<h3>Offline evaluation ({e['prompts']} held-out prompts, {e['users']} users)</h3>"
             + _table(["metric", *names], rows)]
    d = e.get("new_vs_deployed", {})
    paired_text = (f"; paired diff {d['diff_mean']:+.4f} [{d['diff_lo']:+.4f}, {d['diff_hi']:+.4f}], p={d['p_value']:.3g}"
                   if d else "")
    md = [f"- offline ground-truth engagement: deployed {_fmt(e['deployed']['gt_engagement'])}, "
          f"new {_fmt(e['new']['gt_engagement'])} ({e['prompts']} held-out prompts{paired_text})"]
    if d:
        parts.append(f"<p>new minus deployed, paired over prompts: {d['diff_mean']:+.4f} "
                     f"(95% CI [{d['diff_lo']:+.4f}, {d['diff_hi']:+.4f}], p = {d['p_value']:.3g})</p>")
    return parts, md


def _abtest_section(a: dict, turn_dir: Path) -> Fragment:
    """The A/B table, the decision on observable KPIs with its reasons, then its minimum detectable effect
    and the ground-truth verdict beside it (`verdict_lines`)."""
    rows = [[k, c["control"], c["treatment"], c["diff"], f"[{c['ci_low']:.4g}, {c['ci_high']:.4g}]", c["p_value"]]
            for k, c in a["comparisons"].items()]
    verdict = "LAUNCH" if a["decision"]["launch"] else "DO NOT LAUNCH"
    headline, *beside = lines = verdict_lines(a)
    part = ("<h3>A/B test (fresh users)</h3>" + img(a.get("plot"))
            + _table(["metric", "control", "treatment", "diff", "95% CI", "p"], rows)
            + f"<p>users exposed: {html.escape(json.dumps(a['exposed']))}; sample-ratio p = "
              f"{_fmt(a['srm_p_value'])}; unsafe rate: {html.escape(json.dumps(a['unsafe_rate']))}</p>"
            + _decision(f"Decision: {verdict}", a["decision"]["launch"], a["decision"]["reasons"])
            + "".join(f"<p>{html.escape(line)}</p>" for line in lines))
    md = [f"- A/B {headline} — " + "; ".join(a["decision"]["reasons"]), *[f"- A/B {line}" for line in beside]]
    return [part], md


def _decision(text: str, launch: bool, reasons: list[str]) -> str:
    return (f"<p class='decision {'go' if launch else 'stop'}'>{text}</p><ul>"
            + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>")


SECTIONS: dict[str, Callable[[dict, Path], Fragment]] = {
    "ingest": _ingest_section, "filter": _filter_section, "build": _build_section, "sft": _sft_section,
    "preference": _preference_section, "rm": _rm_section,
    "rl": _rl_section, "eval": _eval_section, "abtest": _abtest_section,
}
"""A turn's sections in report order: stage name -> its fragment from the stage's summary."""


NO_AB_WHY = ("an A/B test needs users to show both models to, and ground truth needs their hidden taste; "
             "ingested logs are a record of past users, with neither")
NO_AB_NO_TRUTH = (f"There is no A/B test and no ground truth for real logs: {NO_AB_WHY}. What was measured instead: "
                  "the reward models on held-out users' signals, RL's learned reward, and on held-out users' prompts "
                  "the learned reward, rule metrics and the judge. The learned reward is the one RL climbed: a gain "
                  "in it on new users' prompts says RL's gain carried over to them, not that people would like the "
                  "answers.")


def measured_lines(turn: dict, not_run: dict[str, str]) -> list[str]:
    """A turn without an A/B test (real logs): what it measured, each on one line, then what did not
    run and why (printed after the flywheel)."""
    s = turn["summaries"]
    lines = [f"no A/B test and no ground truth for real logs: {NO_AB_WHY}", *_rm_lines(s)]
    if "rl" in s:
        lines.append(rl_reward_line(s["rl"]))
    if "eval" in s and s["eval"].get("kind") == "logs":
        lines += [f"eval: {line}" for line in logs_eval_lines(s["eval"])]
    return lines + [f"not run: {name}: {why}" for name, why in not_run.items()]


def _rm_lines(summaries: dict) -> list[str]:
    return [line for line in summaries.get("rm", {}).get("lines", []) if line.startswith("rm-eval ")]


def _served_line(summaries: dict) -> str | None:
    """How the turn's logs came about when the deployed model ran behind the real server."""
    server = summaries.get("simulate", {}).get("server")
    if not server:
        return None
    line = (f"logs: through the server (deploy = \"server\"): {server['requests']:,} answers generated over "
            f"HTTP by version {server['version']}, {server['rows_posted']:,} log rows posted to it and read back "
            f"from its store {server['store']}")
    if server.get("prompt_tokens"):
        line += (f"; prompt tokens {server['prompt_tokens']:,}, {server['cached_tokens']:,} of them "
                 f"({server['cached_tokens'] / server['prompt_tokens']:.0%}) from the server's prefix cache")
    return line


def _turn_sections(turn: dict, folder: Path, not_run: dict[str, str] | None = None) -> Fragment:
    """(html parts, markdown lines) for one turn."""
    n = turn["turn"]
    parts = [f"<h2>Turn {n}</h2><p>deployed: <code>{html.escape(turn['deployed'])}</code> &rarr; "
             f"new: <code>{html.escape(turn['model'])}</code></p>"]
    md = [f"## Turn {n}", "", f"- deployed: `{turn['deployed']}`, new: `{turn['model']}`"]
    if (served := _served_line(turn["summaries"])) is not None:
        parts.append(f"<p>{html.escape(served)}</p>")
        md.append(f"- {served}")
    if not_run:
        # The numbers themselves are in the sections below; this says what they stand in for.
        heads = [line for line in _rm_lines(turn["summaries"]) if not line.startswith("rm-eval headline")]
        said = [*[f"reward model on held-out users: {line}" for line in heads],
                *[f"not run: {name}: {why}" for name, why in not_run.items()]]
        parts.append("<h3>What this turn measured</h3>" + f"<p>{html.escape(NO_AB_NO_TRUTH)}</p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in said) + "</ul>")
        md += [f"- {NO_AB_NO_TRUTH}", *[f"- {line}" for line in said]]
    for name, section in SECTIONS.items():
        if name in turn["summaries"]:
            p, m = section(turn["summaries"][name], folder / f"turn-{n}")
            parts += p
            md += m
    if "launched" in turn:
        verdict = "LAUNCH" if turn["launched"] else "DO NOT LAUNCH"
        parts.append(f"<h3>Turn {n} decision</h3>" + _decision(verdict, turn["launched"], turn.get("why", [])))
        md.append(f"- turn decision: **{verdict}** — " + "; ".join(turn.get("why", [])))
    return parts, md


_STYLE = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}.go{color:#070;font-weight:bold}
.stop{color:#b00;font-weight:bold}code{background:#f4f4f4}"""


def _across_turns(state: dict, folder: Path) -> Fragment:
    """Turn over turn (`alignloop.flywheel.compound`): the held-out users' ground truth of each turn's
    model with its interval, each turn's A/B decision with ground truth beside it, and its multi-turn
    KPIs. Nothing when no turn has a simulated eval or an A/B test (real logs)."""
    decisions, kpis = compound.decision_rows(state), compound.multiturn_rows(state)
    png = compound.plot_ground_truth(state, folder / "ground_truth_turns.png")
    if png is None and not decisions:
        return [], []
    parts = ["<h2>Across turns</h2>" + (img(png) if png else "")
             + "<p>Ground truth: each turn's new model on the same held-out users (offline eval), 95% interval "
               "over users; turn 0 is the model deployed before the first turn. The A/B decision is made on "
               "observable KPIs only; its ground truth is beside it, never an input.</p>"]
    if decisions:
        parts.append("<h3>Each turn's A/B decision</h3>" + _table(compound.DECISION_HEADER, decisions))
    if kpis:
        parts.append("<h3>Multi-turn metrics (A/B, per user)</h3>" + _table(compound.MULTI_TURN_HEADER, kpis))
    lines = compound.turn_lines(state)
    return parts, ["## Across turns", "", *[f"- {line}" for line in lines], ""]


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
           "- stage seconds: " + ", ".join(f"{t['stage']} {t['seconds']:.0f}" for t in state["timings"]), ""]
    p, m = _across_turns(state, folder)
    parts += p
    md += m
    for turn in state["turns"]:
        p, m = _turn_sections(turn, folder, state.get("not_run"))
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
