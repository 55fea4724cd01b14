"""`alignloop train ...` commands. `train_app` holds them; `sft_command` can be registered alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(help="Train: SFT (later DPO, distillation) from a recipe.", no_args_is_help=True)



@train_app.callback()
def _group() -> None:
    # A callback keeps `train` a command group while it has only one command (`train sft`).
    pass


RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/sft.toml")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe value: section.key=value (repeatable).")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run folder name (default: recipe's run.name or a timestamp).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Train again even if the stage is up to date.")]


@train_app.command("sft")
def sft_command(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Supervised fine-tuning on messages-format conversations (loss on assistant tokens only).

    A killed run picks up from its last checkpoint when started again with the same recipe.
    """
    from alignloop.recipes import load_recipe
    from alignloop.train.sft import SFTRecipe, run_sft

    stage = run_sft(load_recipe(recipe, SFTRecipe, set or []), run=run, force=force)
    print(stage.path("model"))
