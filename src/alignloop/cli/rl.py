"""`alignloop rl grpo|ppo RECIPE`: RL against an environment; ground truth only for the watch."""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, SetOpt, done, load

app = typer.Typer(help="RL: GRPO (and Dr.GRPO, DAPO, RLOO, REINFORCE++) or PPO against an environment.",
                  no_args_is_help=True)

BackendOpt = Annotated[str, typer.Option("--backend", help="local (one process) or ray.")]

GROUP_METHODS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp")


def _run(recipe, run: str | None, force: bool, backend: str) -> None:
    """Run the RL stage; with env.groundtruth, the simulator's held-out users are built here and handed
    in (evaluation only: the reward-hacking watch), since rl/ sits below eval/ and never imports it."""
    from alignloop.errors import AlignloopError
    from alignloop.eval.rl_hook import heldout_groundtruth, simulated_users_groundtruth
    from alignloop.rl.stage import run_rl

    if backend not in ("local", "ray"):
        raise AlignloopError(f"--backend {backend}: expected 'local' or 'ray'")
    prompts = score = None
    if (users := recipe.env.heldout_users()) is not None:  # (users, seed) with env.groundtruth = true
        if recipe.env.kind == "user_sim":
            score = simulated_users_groundtruth(*users)
        else:
            prompts, score = heldout_groundtruth(*users)
    done(run_rl(recipe, run=run, force=force, groundtruth=score, prompts=prompts, backend=backend))


@app.command("grpo")
def grpo(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
         backend: BackendOpt = "local") -> None:
    """Group-relative policy optimisation; rl.algorithm picks grpo, dr_grpo, dapo, rloo or reinforce_pp.

    A killed run resumes from its last checkpoint when started again with the same recipe.
    """
    from alignloop.errors import AlignloopError
    from alignloop.rl.config import RLRecipe

    loaded = load(recipe, RLRecipe, set_)
    if loaded.rl.algorithm not in GROUP_METHODS:
        raise AlignloopError(f"{recipe}: rl.algorithm = {loaded.rl.algorithm!r} is not a group method; "
                             "use `alignloop rl ppo`")
    _run(loaded, run, force, backend)


@app.command("ppo")
def ppo(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
        backend: BackendOpt = "local") -> None:
    """PPO with a value head on the policy, GAE, clipped policy and value losses."""
    from alignloop.errors import AlignloopError
    from alignloop.rl.config import RLRecipe

    named = load(recipe, _NamedAlgorithm, set_).rl.algorithm
    if named not in (None, "ppo"):
        raise AlignloopError(f"{recipe}: rl.algorithm = {named!r} but this is `alignloop rl ppo`; "
                             "use `alignloop rl grpo` for it, or drop rl.algorithm")
    _run(load(recipe, RLRecipe, [*(set_ or []), "rl.algorithm=ppo"]), run, force, backend)


@app.command("replay-check")
def replay_check(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Routing replay on an MoE policy, measured: the recipe trained with replay and without, every batch
    scored both ways; prints |log p_trainer - log p_engine| and the clipped-ratio share side by side,
    and ends with one JSON line."""
    import json

    from alignloop.rl.config import RLRecipe
    from alignloop.rl.replay_check import replay_check as check

    loaded = load(recipe, RLRecipe, set_)
    print(json.dumps(check(loaded, run or loaded.run.name or "replay-check", force)))


class _AlgorithmOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")
    algorithm: str | None = None


class _NamedAlgorithm(BaseModel):
    """Only what a recipe and its --set say about rl.algorithm: None where they leave it to the command."""

    model_config = ConfigDict(extra="ignore")
    rl: _AlgorithmOnly = _AlgorithmOnly()
