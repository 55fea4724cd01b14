"""`alignloop eval ...` commands (a typer sub-app the main CLI registers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

eval_app = typer.Typer(help="Evaluate models: ground truth on held-out simulated users.", no_args_is_help=True)


@eval_app.callback()
def _group() -> None:
    # A callback keeps `eval` a command group while it has one command.
    pass


@eval_app.command("groundtruth")
def groundtruth_command(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/eval_sim.toml")],
    set: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a recipe value: section.key=value (repeatable).")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Run folder name (default: run.name or a timestamp).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Evaluate again even if up to date.")] = False,
) -> None:
    """Models answer held-out simulated users' prompts; the users' hidden taste scores the answers.

    Prints each model's mean ground-truth engagement and quality with 95% intervals, each model vs the
    baseline (paired difference, interval, p-value), and held-out pair accuracy with [pairs].
    """
    from alignloop.eval.stage import GroundTruthRecipe, run_groundtruth
    from alignloop.recipes import load_recipe

    run_groundtruth(load_recipe(recipe, GroundTruthRecipe, set or []), run=run, force=force)
