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


@app.command("ep-check")
def ep_check(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None,
             trainer: str = typer.Option("pretrain", "--trainer", help="pretrain or sft: the recipe's trainer"),
             processes: int = typer.Option(2, "--processes", min=2, help="torchrun processes = expert-parallel size")
             ) -> None:
    """Expert-parallel gradient sync, shown: the MoE recipe trained on one process and on PROCESSES
    with correct, no, and wrong (experts over all ranks) gradient reduction; per-step gradient norm,
    loss and replica divergence plotted into runs/<run>/ep-check/, distances from the one-process
    reference and the speed of each printed, ending with one JSON line."""
    import json
    from pathlib import Path

    from alignloop.train.ep_check import Plan
    from alignloop.train.ep_check import ep_check as check

    if trainer not in ("pretrain", "sft"):
        raise typer.BadParameter("use pretrain or sft", param_hint="--trainer")
    schema = _schema(trainer)
    loaded = load(recipe, schema, set_)  # fails here, not in four child processes, on a bad recipe
    folder = Path(loaded.run.dir) / (run or loaded.run.name or "ep-check") / "ep-check"
    report = check(Plan(trainer, Path(recipe), list(set_ or []), folder, processes))
    ratio = {"ours": report["modes"]["correct"]["tokens_per_s"], "peer": report["fastest"]["tokens_per_s"],
             "unit": "train tok/s (EP processes vs 1 process)", "ratio": report["speed_ratio"],
             "a2a_share": report["modes"]["correct"].get("a2a_share", 0.0)}
    print(json.dumps(ratio))


def _schema(trainer: str):
    if trainer == "pretrain":
        from alignloop.train.pretrain import PretrainRecipe

        return PretrainRecipe
    from alignloop.train.config import SFTRecipe

    return SFTRecipe
