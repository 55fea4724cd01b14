"""One console for the whole package, so `--quiet` silences everything in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    console.quiet = quiet


def say(message: str) -> None:
    console.print(message)


def progress(transient: bool = True) -> Progress:
    """A bar with count, elapsed time and ETA; invisible under --quiet or when stderr is not a TTY."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=console.quiet,
    )


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work whose length we cannot count (e.g. a one-time model conversion)."""
    if console.quiet:
        yield
        return
    with console.status(message):
        yield
