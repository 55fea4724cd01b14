"""`alignloop chat PROMPT`, `alignloop generate RECIPE`, `alignloop models`: a model, answering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, RunsDirOpt, SetOpt, done, load


def chat(
    prompt: Annotated[str, typer.Argument(help="What the user says.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name or checkpoint folder.")] = "smollm2-135m",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """One-shot chat: render PROMPT with the model's chat template and print the answer."""
    from alignloop.engine.stage import run_chat

    print(run_chat(prompt, model=model, system=system, max_tokens=max_tokens, temperature=temperature,
                   top_p=top_p, seed=seed, run=run, runs_dir=runs_dir))


def generate(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Answer a JSONL file of prompts in batch (resumable; invalid lines are quarantined)."""
    from alignloop.engine.config import GenerateRecipe
    from alignloop.engine.stage import run_generate

    done(run_generate(load(recipe, GenerateRecipe, set_), run=run, force=force))


def models() -> None:
    """List the models the zoo knows by name."""
    from rich.table import Table

    from alignloop.models import KNOWN_MODELS, cache_dir
    from alignloop.ui import console

    table = Table("name", "what", title=f"model zoo (cache: {cache_dir()})")
    for name, what in KNOWN_MODELS.items():
        table.add_row(name, what)
    console.print(table)
    console.print("Also: any local HF checkpoint folder, or an 'org/name' hub id already in the HF cache.")
