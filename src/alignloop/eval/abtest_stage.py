"""`alignloop abtest A B`: the simulated A/B test as a run stage, with a plot and a decision.

An arm is `template` (the simulator's built-in response sampler: the cheap stand-in for a deployed
model that produced the logs), `template:key=value,...` (its knobs changed, see
`alignloop.sim.config.TemplateSection`), or a model the engine loads: a zoo name or a checkpoint
folder such as `runs/<run>/sft/model`.

Output in `runs/<run>/abtest/`: `result.json` (every comparison, the decision on observable KPIs, the
primary metric's minimum detectable effect and the ground-truth check), `per_user_<arm>.parquet`,
`abtest.png` (treatment minus control per metric, with 95% intervals), `manifest.json`. The last lines
printed, also when an unchanged test is skipped, are `alignloop.eval.abtest.verdict_lines`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from alignloop.eval.abtest import ABResult, logged_abtest, simulate_abtest, verdict_lines
from alignloop.eval.config import ABTestRecipe
from alignloop.models.fingerprint import local_model_files
from alignloop.runs import Stage, atomic_path, atomic_write_json, default_run_name
from alignloop.sim.config import EngineResponderSection, TemplateSection
from alignloop.sim.responder import EngineResponder, Responder, TemplateResponder
from alignloop.ui import console, say


def make_arm(spec: str, engine: EngineResponderSection) -> tuple[str, Responder]:
    """(arm name, responder) for an arm spec (see the module docstring)."""
    if spec == "template" or spec.startswith("template:"):
        knobs = {}
        for item in filter(None, spec.partition(":")[2].split(",")):
            key, _, value = item.partition("=")
            knobs[key.strip()] = float(value)
        return spec, TemplateResponder(TemplateSection(**knobs), spec)
    name = spec.rstrip("/")
    return name, EngineResponder.from_section(engine.model_copy(update={"model": name}), f"engine:{name}")


def run_abtest(recipe: ABTestRecipe, control: str, treatment: str, run: str | None = None, force: bool = False,
               arms: tuple[tuple[str, Responder], tuple[str, Responder]] | None = None) -> tuple[Stage, dict]:
    """Run the test (or reuse an identical finished one); return the stage and its result.json."""
    config = {**recipe.model_dump(mode="json", exclude={"run"}), "control": control, "treatment": treatment}
    inputs = [*local_model_files(control), *local_model_files(treatment)]
    stage = Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), "abtest", config, inputs)
    if stage.skip_if_complete(force):
        line = json.loads(stage.path("result.json").read_text())
        print_verdict(line)
        return stage, line
    settings = recipe.decision.settings()
    if arms is None:
        arms = (make_arm(control, recipe.engine), make_arm(treatment, recipe.engine))
    say(f"abtest: {recipe.world.users} fresh users per arm, {recipe.world.days} days: "
        f"{arms[0][0]} (control) vs {arms[1][0]} (treatment)")
    result = simulate_abtest(recipe.world, arms[0], arms[1], settings)
    return stage, _finish(stage, result)


def run_logged_abtest(logs: dict, control: str, treatment: str, recipe: ABTestRecipe, run: str | None = None,
                      shares: tuple[float, float] = (1.0, 1.0), truth: dict | None = None,
                      source: str = "") -> tuple[Stage, dict]:
    """The A/B test a served product ran, read from its logs (`alignloop abtest A B --store`): same
    outputs as the simulated test, decided by the recipe's `[decision]` on observable KPIs."""
    config = {"decision": recipe.decision.model_dump(mode="json"), "control": control, "treatment": treatment,
              "source": source, "shares": list(shares), "rows": {k: v.num_rows for k, v in logs.items()}}
    stage = Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), "abtest", config).start()
    result = logged_abtest(logs, control, treatment, recipe.decision.settings(), shares, truth)
    return stage, _finish(stage, result, {"source": source})


def _finish(stage: Stage, result: ABResult, extra: dict | None = None) -> dict:
    """Write per-user tables, result.json and the plot, finish the stage, print the verdict."""
    outputs = []
    for name, users in result.per_user.items():
        path = stage.path(f"per_user_{_safe(name)}.parquet")
        with atomic_path(path) as tmp:
            users.write_parquet(tmp)
        outputs.append(path)
    line = {**result.to_json(), **(extra or {})}
    atomic_write_json(stage.path("result.json"), line)
    plot = stage.path("abtest.png")
    plot_abtest(result, plot)
    stage.finish([stage.path("result.json"), plot, *outputs])
    print_abtest(result)
    print_verdict(line)
    return line


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


def print_abtest(result: ABResult) -> None:
    control, treatment = result.arms
    table = Table("metric", control, treatment, "diff", "95% CI", "p", title="A/B test (per-user means)")
    for name, c in result.comparisons.items():
        table.add_row(name, f"{c.control:.4f}", f"{c.treatment:.4f}", f"{c.diff:+.4f}",
                      f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]", f"{c.p_value:.2g}")
    console.print(table)
    console.print(f"users exposed: {result.exposed} (sample-ratio p={result.srm_p_value:.3g}); "
                  f"unsafe rate: { {k: round(v, 4) for k, v in result.unsafe_rate.items()} }")
    console.print("decision reasons: " + "; ".join(result.decision.reasons), markup=False)


def print_verdict(result: dict) -> None:
    """The decision on observable KPIs, its minimum detectable effect and the ground truth beside it."""
    for line in verdict_lines(result):
        console.print(line, markup=False, highlight=False)


def plot_abtest(result: ABResult, path: Path) -> None:
    """Treatment minus control per metric, as a share of the control's value, with 95% intervals."""
    import matplotlib  # plots only: kept out of importing the stage

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.comparisons)
    comps = [result.comparisons[n] for n in names]
    scale = [abs(c.control) or 1.0 for c in comps]
    diffs = [100 * c.diff / s for c, s in zip(comps, scale)]
    errs = [[100 * (c.diff - c.ci_low) / s for c, s in zip(comps, scale)],
            [100 * (c.ci_high - c.diff) / s for c, s in zip(comps, scale)]]
    colors = ["tab:green" if c.better(0.05) else "tab:red" if c.worse(0.05) else "tab:gray" for c in comps]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    ax.barh(names, diffs, xerr=errs, color=colors, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("treatment minus control, % of control (95% CI)")
    verdict = "launch" if result.decision.launch else "do not launch"
    ax.set_title(f"A/B: {result.arms[1][-40:]} vs {result.arms[0][-40:]}: {verdict} "
                 f"(on {result.decision.primary}; gt_* is ground truth, not a launch input)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
