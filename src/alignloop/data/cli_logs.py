"""`alignloop logs ...`: the user-log pipeline's commands (a typer sub-app, registered by the main CLI).

Today: `simulate`. Ingest, filter and build join here as they land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

logs_app = typer.Typer(
    help="User logs: simulate a world of users (then ingest, filter, build datasets).",
    no_args_is_help=True,
)


@logs_app.callback()
def _logs() -> None:
    """User logs: simulate a world of users (then ingest, filter, build datasets)."""
    # A callback keeps `logs` a command group even while it has a single command.


_SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe value: section.key=value (repeatable).")]


@logs_app.command("simulate")
def simulate(
    recipe: Annotated[Path, typer.Argument(help="A simulate recipe (TOML), e.g. recipes/simulate.toml.")],
    set_: _SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (overrides run.name).")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if the recipe is unchanged.")] = False,
) -> None:
    """Simulate users chatting with a deployed model: logs/ and ground_truth/ in runs/<run>/simulate/."""
    from alignloop.recipes import load_recipe
    from alignloop.sim.config import SimulateRecipe
    from alignloop.sim.stage import run_simulate

    run_simulate(load_recipe(recipe, SimulateRecipe, set_ or []), run=run, force=force)
