"""`alignloop rm train|eval RECIPE` and `alignloop reward fit-weights RECIPE`: reward models from user signals."""

from __future__ import annotations

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, SetOpt, done, load, one_command_group

rm_app = typer.Typer(help="Reward models from user signals: train heads, evaluate on held-out users.",
                     no_args_is_help=True)
reward_app = one_command_group("Combined reward: learn component weights from logs.")


@rm_app.command("train")
def rm_train(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Train reward heads on a backbone from `logs build` sets: runs/<run>/rm/. Embeddings are cached
    there, so a killed run resumes where it stopped."""
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stage import run_rm_train

    done(run_rm_train(load(recipe, RMRecipe, set_), run=run, force=force))


@rm_app.command("eval")
def rm_eval(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Held-out-user metrics per head vs baselines, the simulator's ceiling and the shortcut check: runs/<run>/rm-eval/."""
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stage import run_rm_eval

    done(run_rm_eval(load(recipe, RMRecipe, set_), run=run, force=force))


@reward_app.command("fit-weights")
def fit_weights(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Learn component weights that predict the KPI (combine.kpi) and compare with equal weights on held-out users."""
    from alignloop.rewards.config import RMRecipe
    from alignloop.rewards.stage import run_fit_weights

    done(run_fit_weights(load(recipe, RMRecipe, set_), run=run, force=force))
