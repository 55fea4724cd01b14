"""The options every stage command shares, declared once: the recipe, `--set`, `--run`, `--force`.

A stage command is three lines: `load` the recipe with its overrides, run the stage, `done(stage)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer

from alignloop.recipes import Section, load_recipe
from alignloop.runs import Stage

RecipeArg = Annotated[Path, typer.Argument(help="A recipe (TOML), e.g. recipes/quickstart.toml.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe value: section.key=value (repeatable).")]
RunOpt = Annotated[str | None, typer.Option(
    "--run", help="Run folder name (default: the recipe's run.name, else a timestamp).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run again even if inputs and config are unchanged.")]
RunsDirOpt = Annotated[Path, typer.Option(help="Where run folders go.")]

R = TypeVar("R", bound=Section)


def load(path: Path, kind: type[R], overrides: list[str] | None) -> R:
    """The recipe at `path`, validated as `kind`, with `--set` overrides applied."""
    return load_recipe(path, kind, overrides or [])


def done(stage: Stage) -> None:
    """How every stage command ends: the stage folder on stdout (alone, so scripts can read it)."""
    print(stage.dir)


def one_command_group(help: str) -> typer.Typer:
    """A command group that has one command so far: `alignloop <group> <command>`, help when called bare.

    Typer runs a one-command app as that command; the no-op callback keeps it a group, so the
    command's name stays in the command line (and adding a second command changes nothing there).
    """
    return typer.Typer(help=help, no_args_is_help=True, callback=_stay_a_group)


def _stay_a_group() -> None:
    pass
