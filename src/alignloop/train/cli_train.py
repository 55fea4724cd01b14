"""`alignloop train ...` commands. `train_app` holds them; `sft_command` can be registered alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(help="Train: SFT, DPO (IPO, SimPO) and distillation from a recipe.", no_args_is_help=True)



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


@train_app.command("dpo")
def dpo_command(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Preference optimisation (DPO, IPO or SimPO: train.loss) from prompt/chosen/rejected pairs.

    Reference log-probs are computed once and cached in the stage folder; held-out pair accuracy
    and reward margins are logged at every eval. A killed run resumes from its last checkpoint.
    """
    from alignloop.recipes import load_recipe
    from alignloop.train.dpo import DPORecipe, run_dpo

    stage = run_dpo(load_recipe(recipe, DPORecipe, set or []), run=run, force=force)
    print(stage.path("model"))


@train_app.command("distill")
def distill_command(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Distil a teacher into a student: SFT on its answers (sequence) or KL to its top-k log-probs (logit).

    Logit level needs the same tokenizer on both sides. Teacher answers and top-k log-probs are
    cached in the stage folder; a killed run resumes from its last checkpoint.
    """
    from alignloop.recipes import load_recipe
    from alignloop.train.distill import DistillRecipe, run_distill

    stage = run_distill(load_recipe(recipe, DistillRecipe, set or []), run=run, force=force)
    print(stage.path("model"))
