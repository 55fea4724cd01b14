"""`alignloop abtest A B`: the simulated A/B test as a run stage, with a plot and a decision.

An arm is `template` (the simulator's built-in response sampler: the cheap stand-in for a deployed
model that produced the logs), `template:key=value,...` (its knobs changed, see
`alignloop.sim.config.TemplateSection`), or a model the engine loads: a zoo name or a checkpoint
folder such as `runs/<run>/sft/model`.

Output in `runs/<run>/abtest/`: `result.json` (every comparison and the decision), `per_user_<arm>.parquet`,
`abtest.png` (treatment minus control per metric, with 95% intervals), `manifest.json`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from alignloop.eval.abtest import METRICS, ABResult, ABSettings, run_abtest
from alignloop.recipes import Section
from alignloop.runs import Stage, atomic_path, atomic_write_json, default_run_name
from alignloop.sections import RunSection
from alignloop.sim.config import EngineResponderSection, SimConfig, TemplateSection
from alignloop.sim.responder import EngineResponder, Responder, TemplateResponder
from alignloop.ui import say


class DecisionSection(Section):
    primary: str = "gt_engagement"
    guardrails: list[str] = ["continue_rate", "return_1d", "thumbs_up_rate"]
    alpha: float = Field(0.05, gt=0, lt=1)
    unsafe_bar: float = Field(0.03, ge=0, le=1, description="highest unsafe rate a launch may have")
    srm_alpha: float = Field(0.001, gt=0, lt=1)
    resamples: int = Field(2000, ge=100)
    seed: int = 0

    @model_validator(mode="after")
    def _known_metrics(self) -> DecisionSection:
        unknown = {self.primary, *self.guardrails} - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}")
        return self

    def settings(self) -> ABSettings:
        return ABSettings(self.primary, tuple(self.guardrails), self.alpha, self.unsafe_bar,
                          self.srm_alpha, self.resamples, self.seed)


class ABTestRecipe(Section):
    run: RunSection = RunSection()
    world: SimConfig = SimConfig(users=200, days=7, max_turns=8)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)
    decision: DecisionSection = DecisionSection()


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


def run_abtest_stage(recipe: ABTestRecipe, control: str, treatment: str, run: str | None = None,
                     force: bool = False, arms: tuple[tuple[str, Responder], tuple[str, Responder]] | None = None
                     ) -> tuple[Stage, dict]:
    """Run the test (or reuse an identical finished one); return the stage and its result.json."""
    import json

    config = {**recipe.model_dump(mode="json", exclude={"run"}), "control": control, "treatment": treatment}
    inputs = [p for p in (Path(control), Path(treatment)) if p.is_dir()]
    weight_files = [f for d in inputs for f in sorted(d.glob("*.safetensors"))]
    stage = Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), "abtest", config, weight_files)
    if not force and stage.is_complete():
        say(f"[green]abtest: up to date[/] ({stage.dir}), skipped")
        return stage, json.loads(stage.path("result.json").read_text())
    stage.start()
    settings = recipe.decision.settings()
    if arms is None:
        arms = (make_arm(control, recipe.engine), make_arm(treatment, recipe.engine))
    say(f"abtest: {recipe.world.users} fresh users per arm, {recipe.world.days} days: "
        f"{arms[0][0]} (control) vs {arms[1][0]} (treatment)")
    result = run_abtest(recipe.world, arms[0], arms[1], settings)
    outputs = []
    for name, users in result.per_user.items():
        path = stage.path(f"per_user_{_safe(name)}.parquet")
        with atomic_path(path) as tmp:
            users.write_parquet(tmp)
        outputs.append(path)
    line = result.to_json()
    atomic_write_json(stage.path("result.json"), line)
    plot = stage.path("abtest.png")
    plot_abtest(result, plot)
    stage.finish([stage.path("result.json"), plot, *outputs])
    print_abtest(result)
    return stage, line


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-60:]


def print_abtest(result: ABResult) -> None:
    from rich.table import Table

    from alignloop.ui import console

    control, treatment = result.arms
    table = Table("metric", control, treatment, "diff", "95% CI", "p", title="A/B test (per-user means)")
    for name, c in result.comparisons.items():
        table.add_row(name, f"{c.control:.4f}", f"{c.treatment:.4f}", f"{c.diff:+.4f}",
                      f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}]", f"{c.p_value:.2g}")
    console.print(table)
    console.print(f"users exposed: {result.exposed} (sample-ratio p={result.srm_p_value:.3g}); "
                  f"unsafe rate: { {k: round(v, 4) for k, v in result.unsafe_rate.items()} }")
    verdict = "[bold green]LAUNCH[/]" if result.decision.launch else "[bold red]DO NOT LAUNCH[/]"
    console.print(f"decision: {verdict}: " + "; ".join(result.decision.reasons))


def plot_abtest(result: ABResult, path: Path) -> None:
    """Treatment minus control per metric, as a share of the control's value, with 95% intervals."""
    import matplotlib

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
    ax.set_title(f"A/B: {result.arms[1][-40:]} vs {result.arms[0][-40:]}: {verdict}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
