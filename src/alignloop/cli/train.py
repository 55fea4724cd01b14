"""`alignloop train sft|dpo|distill|pretrain RECIPE`: the trainers (under torchrun too: `-m alignloop.cli`)."""

from __future__ import annotations

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, SetOpt, done, load

app = typer.Typer(help="Trainers: SFT on chosen swipes, DPO (IPO, SimPO) from swipe pairs, distillation.",
                  no_args_is_help=True)


@app.command("sft")
def sft(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Supervised fine-tuning on messages-format conversations (loss on assistant tokens only).

    A killed run picks up from its last checkpoint when started again with the same recipe.
    """
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    done(run_sft(load(recipe, SFTRecipe, set_), run=run, force=force))


@app.command("dpo")
def dpo(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Preference optimisation (DPO, IPO or SimPO: train.loss) from prompt/chosen/rejected pairs.

    Reference log-probs are computed once and cached in the stage folder; held-out pair accuracy
    and reward margins are logged at every eval. A killed run resumes from its last checkpoint.
    """
    from alignloop.train.config import DPORecipe
    from alignloop.train.stage import run_dpo

    done(run_dpo(load(recipe, DPORecipe, set_), run=run, force=force))


@app.command("distill")
def distill(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Distil a teacher into a student: SFT on its answers (sequence) or KL to its top-k log-probs (logit).

    Logit level needs the same tokenizer on both sides. Teacher answers and top-k log-probs are
    cached in the stage folder; a killed run resumes from its last checkpoint.
    """
    from alignloop.train.config import DistillRecipe
    from alignloop.train.stage import run_distill

    done(run_distill(load(recipe, DistillRecipe, set_), run=run, force=force))


@app.command("pretrain")
def pretrain(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Pre-train a zoo preset from scratch on chat text (simulated world + chitchat), every token learned.

    MoE models (tiny-deepseek) balance experts with the router bias and plot per-layer MaxVio.
    """
    from alignloop.train.pretrain import PretrainRecipe, run_pretrain

    done(run_pretrain(load(recipe, PretrainRecipe, set_), run=run, force=force))
