"""`alignloop rm train|eval RECIPE` and `alignloop reward fit-weights RECIPE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

rm_app = typer.Typer(help="Reward models from user signals: train heads, evaluate on held-out users.",
                     no_args_is_help=True)
reward_app = typer.Typer(help="Combined reward: learn component weights from logs.", no_args_is_help=True)

RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/rm.toml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: section.key=value.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run folder name (default: recipe's run.name).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run again even if the stage is up to date.")]


@reward_app.callback()
def _reward_group() -> None:
    pass


@rm_app.command("train")
def rm_train(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Train reward heads on a backbone from `logs build` sets: runs/<run>/rm/. Embeddings are cached
    there, so a killed run resumes where it stopped."""
    from alignloop.recipes import load_recipe
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stages import run_rm_train

    print(run_rm_train(load_recipe(recipe, RMRecipe, set or []), run=run, force=force).dir)


@rm_app.command("eval")
def rm_eval(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Held-out-user metrics per head vs baselines, the simulator's ceiling and the shortcut check: runs/<run>/rm-eval/."""
    from alignloop.recipes import load_recipe
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stages import run_rm_eval

    run_rm_eval(load_recipe(recipe, RMRecipe, set or []), run=run, force=force)


@reward_app.command("fit-weights")
def fit_weights(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Learn component weights that predict the KPI (combine.kpi) and compare with equal weights on held-out users."""
    from alignloop.recipes import load_recipe
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stages import run_fit_weights

    run_fit_weights(load_recipe(recipe, RMRecipe, set or []), run=run, force=force)
