"""`alignloop flywheel RECIPE`: turns of the loop, stage by stage, then the report.

Resuming is the stages' own business: each one skips itself when its manifest matches its config
and inputs, and the trainers resume from their last checkpoint; so a killed flywheel re-run with
the same command picks up in the stage it was killed in, and nothing finished is redone.
`--from STAGE` forces that stage and every later one to run again.

A turn deploys its model for the next turn only if its A/B test said launch on observable KPIs (and
no reward hacking was caught); otherwise the next turn starts again from the model that stayed
deployed. The ground-truth verdict is printed and reported beside that decision, never an input to it.

On real logs (`[logs] source = "ingest"`) there is no A/B test and no ground truth (`not_run` says
why): the turn ends with what was measured instead, and nothing is launched by the loop itself.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.table import Table

from alignloop.errors import AlignloopError
from alignloop.eval.abtest import verdict_lines
from alignloop.flywheel.compound import turn_lines
from alignloop.flywheel.config import SOURCES, STAGES, FlywheelRecipe, not_run
from alignloop.flywheel.report import measured_lines, write_report
from alignloop.flywheel.stages import TURN_STAGES, Turn, pretrain_base
from alignloop.runs import atomic_write_json, default_run_name
from alignloop.ui import console, say


def planned_stages(recipe: FlywheelRecipe) -> list[str]:
    """The stages one turn runs, in order: its logs' source, never the other one, none that
    `not_run` leaves out, and `preference` only when switched on."""
    other = [s for s in SOURCES if s != recipe.logs.source]
    left_out = set(not_run(recipe)) | set(other) | set(recipe.flywheel.skip)
    if not recipe.preference.enabled:
        left_out.add("preference")
    return [s for s in STAGES if s in TURN_STAGES and s not in left_out]


def run_flywheel(recipe: FlywheelRecipe, run: str | None = None, from_stage: str | None = None) -> dict:
    run = run or recipe.run.name or default_run_name()
    stages = planned_stages(recipe)
    first = ["pretrain"] if recipe.pretrain.enabled else []
    if from_stage is not None and from_stage not in [*first, *stages, "report"]:
        raise AlignloopError(f"--from {from_stage}: not a stage of this flywheel; stages: "
                             f"{', '.join([*first, *stages])}, report")
    started = time.perf_counter()
    deployed = recipe.flywheel.base_model
    left_out = not_run(recipe)
    for name, why in left_out.items():
        say(f"[yellow]not run: {name}[/]: {why}")
    forcing = from_stage == "pretrain"
    timings: list[dict] = []
    if recipe.pretrain.enabled:  # a random-init preset learns language first; turn 1 deploys the result
        clock = time.perf_counter()
        deployed = pretrain_base(recipe, run, forcing)
        timings.append({"turn": None, "stage": "pretrain", "seconds": round(time.perf_counter() - clock, 2),
                        "forced": forcing})
    turns: list[dict] = []
    for number in range(1, recipe.flywheel.turns + 1):
        turn = Turn(recipe, run, number, deployed=deployed, model=deployed)
        say(f"[bold]flywheel {run}: turn {number}/{recipe.flywheel.turns}[/], deployed model: {deployed}")
        for name in stages:
            forcing = forcing or name == from_stage
            clock = time.perf_counter()
            turn.summaries[name] = TURN_STAGES[name](turn, forcing)
            timings.append({"turn": number, "stage": name, "seconds": round(time.perf_counter() - clock, 2),
                            "forced": forcing})
        launched, why = launch_decision(turn.summaries, no_abtest=left_out.get("abtest"))
        turns.append({"turn": number, "deployed": deployed, "model": turn.model, "launched": launched, "why": why,
                      "summaries": turn.summaries})
        if launched:
            deployed = turn.model
    state = {"run": run, "recipe": recipe.model_dump(mode="json"), "stages": stages, "turns": turns,
             "timings": timings, "deployed_at_end": deployed, "logs_source": recipe.logs.source,
             "not_run": left_out}
    folder = Path(recipe.run.dir) / run
    clock = time.perf_counter()
    state["report"] = {k: str(v) for k, v in write_report(state, folder).items()}
    timings.append({"turn": None, "stage": "report", "seconds": round(time.perf_counter() - clock, 2),
                    "forced": True})
    state["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(folder / "flywheel.json", state)
    print_timings(state)
    return state


def launch_decision(summaries: dict, no_abtest: str | None = None) -> tuple[bool, list[str]]:
    """(launch?, reasons): the A/B test's decision on observable KPIs decides (safety gate first, then
    the primary metric and guardrails; its ground-truth check is only reported), and a model whose RL
    reward the ground-truth watch caught being hacked is not launched either. A turn with no A/B test
    (`no_abtest`: why) launches nothing: offline numbers alone never deploy a model here."""
    if no_abtest is not None and "abtest" not in summaries:
        return False, [f"{no_abtest}; the offline numbers are for people to decide on"]
    decision = summaries.get("abtest", {}).get("decision", {})
    launch = bool(decision.get("launch"))
    why = ["A/B: " + ("launch" if launch else "no launch")
           + (f" ({'; '.join(decision['reasons'])})" if decision.get("reasons") else "")]
    if summaries.get("rl", {}).get("reward_hacking", {}).get("hacking"):
        launch = False
        why.append("RL: reward hacking detected (its reward rose while ground-truth engagement fell)")
    return launch, why


def print_timings(state: dict) -> None:
    table = Table("turn", "stage", "seconds", title=f"flywheel {state['run']}: stage timings")
    for t in state["timings"]:
        table.add_row("" if t["turn"] is None else str(t["turn"]), t["stage"], f"{t['seconds']:.1f}")
    table.add_row("", "[bold]total[/]", f"[bold]{state['seconds']:.1f}[/]")
    console.print(table)
    for t in state["turns"]:
        verdict = "[green]launched[/]" if t["launched"] else "[red]not launched[/]"
        console.print(f"turn {t['turn']}: {t['model']} {verdict}: " + "; ".join(t.get("why", [])))
        if "abtest" in t["summaries"]:
            for line in verdict_lines(t["summaries"]["abtest"]):
                console.print(f"  A/B {line}", markup=False, highlight=False)
        else:
            for line in measured_lines(t, state.get("not_run", {})):
                console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
    if len(state["turns"]) > 1:
        # Turn over turn: does the loop compound (ground truth rising, launches the KPIs justified)?
        for line in turn_lines(state):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {state['report'].get('html')}")
