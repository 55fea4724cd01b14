"""`alignloop flywheel RECIPE` and `alignloop report RUN`: the whole loop, and where a run of it stands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from alignloop.cli.options import RecipeArg, RunOpt, SetOpt, load


def flywheel(
    recipe: RecipeArg,
    set_: SetOpt = None,
    run: RunOpt = None,
    from_: Annotated[str | None, typer.Option("--from", help="Re-run this stage and every later one.")] = None,
    turns: Annotated[int | None, typer.Option(min=1, help="Turns of the loop (overrides flywheel.turns).")] = None,
) -> None:
    """The whole loop: simulate logs -> filter -> build -> SFT -> RM -> RL -> eval -> A/B -> report.
    With [logs] source = "ingest", real logs instead of simulated ones, and no A/B test."""
    from alignloop.flywheel.config import FlywheelRecipe
    from alignloop.flywheel.stage import run_flywheel

    overrides = list(set_ or []) + ([f"flywheel.turns={turns}"] if turns else [])
    run_flywheel(load(recipe, FlywheelRecipe, overrides), run=run, from_stage=from_)


def report(
    run: Annotated[Path, typer.Argument(help="A run folder (runs/<run>) or its name under runs/.")],
) -> None:
    """Where a flywheel run is: each stage done or not, its time, the decision, the report's path."""
    from rich.table import Table

    from alignloop.errors import AlignloopError
    from alignloop.flywheel.report import where_is
    from alignloop.ui import console

    folder = run if run.is_dir() else Path("runs") / run
    if not folder.is_dir():
        raise AlignloopError(f"no run folder {run} (nor runs/{run})")
    rows = where_is(folder)
    if not rows:
        raise AlignloopError(f"{folder}: no flywheel turns (turn-N folders) in it")
    table = Table("turn", "stage", "state", "seconds", title=f"flywheel run {folder}")
    for r in rows:
        table.add_row(r["turn"], r["stage"], "[green]done[/]" if r["done"] else "[yellow]not finished[/]",
                      "" if r["seconds"] is None else f"{r['seconds']:.1f}")
    console.print(table)
    state = folder / "flywheel.json"
    if state.is_file():
        s = json.loads(state.read_text())
        for t in s["turns"]:
            console.print(f"turn {t['turn']}: {'launched' if t['launched'] else 'not launched'} ({t['model']})")
        console.print(f"report: {s['report'].get('html')} ({s['seconds']:.0f} s in all)")
    else:
        console.print("no report yet: the flywheel has not finished (re-run the same command to resume)")
