"""`alignloop eval groundtruth|fp8 RECIPE` and `alignloop abtest A B`: offline ground truth, FP8 serving, the A/B test."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, SetOpt, load, one_command_group

app = one_command_group("Evaluate models: ground truth on held-out simulated users.")


@app.command("groundtruth")
def groundtruth(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Models answer held-out simulated users' prompts; the users' hidden taste scores the answers.

    Prints each model's mean ground-truth engagement and quality with 95% intervals, each model vs the
    baseline (paired difference, interval, p-value), and held-out pair accuracy with [pairs].
    """
    from alignloop.eval.config import GroundTruthRecipe
    from alignloop.eval.stage import run_groundtruth

    run_groundtruth(load(recipe, GroundTruthRecipe, set_), run=run, force=force)


@app.command("fp8")
def fp8(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """BF16 vs FP8 after the fact (PTQ) vs FP8 trained for (QAT): the recipe's SFT fine-tuned twice, both
    exported to FP8, scored on held-out loss and on held-out simulated users' ground truth (gain over
    the base model, paired, 95% intervals, share of the gain kept), with the weights' bytes."""
    from alignloop.eval.fp8 import Fp8Recipe, run_fp8_experiment

    run_fp8_experiment(load(recipe, Fp8Recipe, set_))


def abtest(
    control: Annotated[str, typer.Argument(help="Control arm: 'template[:k=v,...]', a zoo name or a model folder "
                                                "(with --store: a served model version).")],
    treatment: Annotated[str, typer.Argument(help="Treatment arm, same forms.")],
    recipe: Annotated[Path | None, typer.Option(help="An abtest recipe (TOML); default: built-in settings.")] = None,
    store: Annotated[str | None, typer.Option(
        help="Read a real A/B test from `alignloop serve`'s log store (SQLite file or postgresql:// URL) "
             "instead of simulating one: users are in the arm of the version that served them.")] = None,
    shares: Annotated[str, typer.Option(help="With --store: the arms' assigned shares, for the sample-ratio "
                                             "check, e.g. 1,1.")] = "1,1",
    ground_truth: Annotated[Path | None, typer.Option(
        help="With --store, when simulated users were the clients: their ground_truth/ folder, reported "
             "beside the decision (never an input to it).")] = None,
    set_: SetOpt = None,
    run: RunOpt = None,
    force: ForceOpt = False,
) -> None:
    """A/B test: simulated on fresh users (per-user metrics, CIs, p-values, safety gate, decision), or read
    from a served product's logs (--store)."""
    from alignloop.eval.abtest_stage import run_abtest, run_logged_abtest
    from alignloop.eval.config import ABTestRecipe

    if recipe is None:
        if set_:
            raise typer.BadParameter("--set needs --recipe")
        loaded = ABTestRecipe()
    else:
        loaded = load(recipe, ABTestRecipe, set_)
    if store is None:
        run_abtest(loaded, control, treatment, run=run, force=force)
        return
    from alignloop.data.io import read_tables
    from alignloop.serve.store import LogStore
    from alignloop.sim.truth import TRUTH_SCHEMAS

    a, _, b = shares.partition(",")
    truth = read_tables(ground_truth, TRUTH_SCHEMAS) if ground_truth else None
    run_logged_abtest(LogStore(store).tables(), control, treatment, loaded, run=run, shares=(float(a), float(b)),
                      truth=truth, source=store)
