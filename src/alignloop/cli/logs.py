"""`alignloop logs simulate|ingest|filter|build`: the user-log pipeline, stage by stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, RunsDirOpt, SetOpt, done, load

if TYPE_CHECKING:
    from alignloop.data.config import LogsRecipe

app = typer.Typer(help="User logs: simulate a world, ingest real logs, filter, build datasets.",
                  no_args_is_help=True)

EngineOpt = Annotated[str, typer.Option(
    help="polars: partitions one after another in this process; ray: mapped over Ray Data (a local Ray "
         "unless RAY_ADDRESS names a cluster). Same outputs either way.")]


@app.command("simulate")
def simulate(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Simulate users chatting with a deployed model: logs/ and ground_truth/ in runs/<run>/simulate/."""
    from alignloop.sim.config import SimulateRecipe
    from alignloop.sim.stage import run_simulate

    done(run_simulate(load(recipe, SimulateRecipe, set_), run=run, force=force))


@app.command("export")
def export(
    store: Annotated[str, typer.Argument(help="The server's log store: a SQLite file or a postgresql:// URL.")],
    out: Annotated[Path, typer.Argument(help="Folder for <table>.parquet (what `alignloop logs ingest` takes).")],
) -> None:
    """Export the log store of `alignloop serve` as the five log tables (Parquet), for ingest."""
    from alignloop.serve.store import LogStore

    counts = LogStore(store).export(out)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    print(out)


@app.command("ingest")
def ingest(
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="JSONL or Parquet files, or log folders (<table>.parquet / <table>.jsonl); chat exports "
             "(OpenAI, ShareGPT, Parquet, saved datasets) too, see --format.", show_default=False)] = None,
    chitchat: Annotated[bool, typer.Option(
        "--chitchat", help="Also ingest the chitchat-dataset package's conversations (pip install chitchat-dataset).")
    ] = False,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Start from empty tables instead of adding to what this run already ingested.")] = False,
    format_: Annotated[str, typer.Option(
        "--format", help="auto (told by content), logs (the log schema), openai (JSONL/JSON with messages), "
                         "sharegpt (JSONL/JSON with conversations), table (Parquet or a saved datasets folder).")
    ] = "auto",
) -> None:
    """Validate log rows into conformed tables; every bad row goes to quarantine.jsonl with its reason."""
    from alignloop.data.stage import run_ingest

    stage, _ = run_ingest(list(inputs or []), chitchat=chitchat, run=run, runs_dir=runs_dir, fresh=fresh,
                          format=format_)
    done(stage)


@app.command("filter")
def filter_(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
            engine: EngineOpt = "polars") -> None:
    """Filter logs (bots, skimmers, repeats, quality, diversity, per-user cap): runs/<run>/filter/."""
    from alignloop.data.config import LogsRecipe
    from alignloop.data.stage import run_filter_stage

    config = load(recipe, LogsRecipe, set_)
    _release_when_streamed(config, run, "filter")
    done(run_filter_stage(config, run=run, force=force, engine=engine))


@app.command("build")
def build(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False,
          engine: EngineOpt = "polars") -> None:
    """Build SFT, DPO, reward-model and distillation sets from filtered logs: runs/<run>/build/."""
    from alignloop.data.config import LogsRecipe
    from alignloop.data.stage import run_build_stage

    config = load(recipe, LogsRecipe, set_)
    _release_when_streamed(config, run, "build")
    done(run_build_stage(config, run=run, force=force, engine=engine))


def _release_when_streamed(recipe: LogsRecipe, run: str | None, stage: Literal["filter", "build"]) -> None:
    """Start the command again handing freed memory back (`freed_memory`) when its logs are
    streamed through partitions on disk: kept pages would grow its footprint past the partition."""
    from alignloop import freed_memory
    from alignloop.data.stage import streamed

    if streamed(recipe, run, stage):
        freed_memory.restart_under("release")
