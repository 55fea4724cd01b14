"""`alignloop flywheel RECIPE` and `alignloop report RUN` (registered by the main CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def flywheel_command(
    recipe: Annotated[Path, typer.Argument(help="A flywheel recipe (TOML), e.g. recipes/quickstart.toml.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: section.key=value.")] = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (overrides run.name).")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="Re-run this stage and every later one.")] = None,
    turns: Annotated[Optional[int], typer.Option(min=1, help="Turns of the loop (overrides flywheel.turns).")] = None,
) -> None:
    """The whole loop: simulate logs -> filter -> build -> SFT -> RM -> RL -> eval -> A/B -> report."""
    from alignloop.flywheel.recipe import FlywheelRecipe
    from alignloop.flywheel.run import run_flywheel
    from alignloop.recipes import load_recipe

    overrides = list(set_ or []) + ([f"flywheel.turns={turns}"] if turns else [])
    run_flywheel(load_recipe(recipe, FlywheelRecipe, overrides), run=run, from_stage=from_)


def report_command(
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
