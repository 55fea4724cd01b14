"""The `alignloop` command: one subcommand group per stage of the loop, each in its own module here.

This package sits on top of everything and is the only one that imports typer. Its command modules
import the library inside each command, so `alignloop --help` answers without loading torch.
Every user mistake surfaces as an `AlignloopError` and is printed here as one red line (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

from alignloop import freed_memory

# What Polars' and pyarrow's allocators do with freed memory (`alignloop.freed_memory`): they read
# it when they load, so it is chosen here, before anything imports them. `logs filter` and `logs
# build` keep freed pages until they exit, to reuse them, and start themselves again handing them
# back when their logs turn out to be streamed through partitions on disk; the other `logs`
# commands stream, and hand them back. Other commands keep the libraries' defaults.
_words = [a for a in sys.argv[1:] if not a.startswith("-")][:2]
if _words in (["logs", "filter"], ["logs", "build"]):
    freed_memory.choose("keep")
elif _words[:1] == ["logs"]:
    freed_memory.choose("release")

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from alignloop import __version__  # noqa: E402
from alignloop.cli import bench, chat, env, eval, export, flywheel, logs, reward, rl, serve, template, train  # noqa: E402
from alignloop.errors import AlignloopError  # noqa: E402
from alignloop.ui import console, set_quiet  # noqa: E402

app = typer.Typer(
    name="alignloop",
    help="Turn a chat product's user logs into a better dialogue model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"alignloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    set_quiet(quiet)


# In the loop's order: serve and chat with a model, logs, trainers, reward models, RL, evaluation,
# the whole flywheel; then the tools around it.
for command in (chat.chat, chat.generate, chat.models):
    app.command()(command)
app.command("serve")(serve.serve)
app.add_typer(logs.app, name="logs")
app.add_typer(train.app, name="train")
app.add_typer(reward.rm_app, name="rm")
app.add_typer(reward.reward_app, name="reward")
app.add_typer(rl.app, name="rl")
app.add_typer(env.app, name="env")
app.add_typer(eval.app, name="eval")
app.command("abtest")(eval.abtest)
app.command("flywheel")(flywheel.flywheel)
app.command("report")(flywheel.report)
app.add_typer(export.app, name="export")
app.add_typer(template.app, name="template")
app.add_typer(bench.app, name="bench")


def main() -> None:
    try:
        app()
    except AlignloopError as e:
        console.quiet = False
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
