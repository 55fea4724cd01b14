"""`alignloop rl grpo|ppo RECIPE`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

rl_app = typer.Typer(help="RL: GRPO (and Dr.GRPO, DAPO, RLOO, REINFORCE++) or PPO against an environment.",
                     no_args_is_help=True)

RecipeArg = Annotated[Path, typer.Argument(help="TOML recipe, e.g. recipes/grpo_arithmetic.toml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: section.key=value.")]
RunOpt = Annotated[str | None, typer.Option("--run", help="Run folder name (default: run.name or a timestamp).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run again even if the stage is up to date.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="local (one process) or ray.")]

GROUP_METHODS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp")


# Set by `alignloop.cli`: (users, seed) -> (prompts, score). Ground truth is evaluation: rl/ never
# imports it, the CLI hands it in for env.groundtruth (the reward-hacking watch).
# (env kind, users, seed) -> (prompts or None, score)
GROUNDTRUTH: Callable[[str, int, int], tuple[list[list[dict]] | None, Callable]] | None = None


def _run(recipe_path: Path, overrides: list[str], run: str | None, force: bool, backend: str) -> None:
    from alignloop.errors import AlignloopError
    from alignloop.recipes import load_recipe
    from alignloop.rl.config import RLRecipe
    from alignloop.rl.run import build_env, run_rl

    if backend not in ("local", "ray"):
        raise AlignloopError(f"--backend {backend}: expected 'local' or 'ray'")
    recipe = load_recipe(recipe_path, RLRecipe, overrides)
    env = score = None
    if recipe.env.groundtruth:
        if GROUNDTRUTH is None:
            raise AlignloopError("env.groundtruth: no ground-truth provider (run through the `alignloop` CLI)")
        prompts, score = GROUNDTRUTH(recipe.env.kind, recipe.env.users, recipe.env.users_seed)
        env = build_env(recipe, prompts=prompts) if prompts is not None else None
    stage = run_rl(recipe, run=run, force=force, env=env, groundtruth=score, backend=backend)
    print(stage.dir)


@rl_app.command("grpo")
def grpo_command(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
                 backend: BackendOpt = "local") -> None:
    """Group-relative policy optimisation; rl.algorithm picks grpo, dr_grpo, dapo, rloo or reinforce_pp.

    A killed run resumes from its last checkpoint when started again with the same recipe.
    """
    from alignloop.errors import AlignloopError
    from alignloop.recipes import load_recipe
    from alignloop.rl.config import RLRecipe

    algorithm = load_recipe(recipe, RLRecipe, set or []).rl.algorithm
    if algorithm not in GROUP_METHODS:
        raise AlignloopError(f"{recipe}: rl.algorithm = {algorithm!r} is not a group method; use `alignloop rl ppo`")
    _run(recipe, set or [], run, force, backend)


@rl_app.command("ppo")
def ppo_command(recipe: RecipeArg, set: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
                backend: BackendOpt = "local") -> None:
    """PPO with a value head on the policy, GAE, clipped policy and value losses."""
    _run(recipe, [*(set or []), "rl.algorithm=ppo"], run, force, backend)
