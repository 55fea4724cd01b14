"""`alignloop logs filter RECIPE` and `alignloop logs build RECIPE`: the filter and build stages.

    runs/<run>/filter/                    reads runs/<run>/ingest/tables, else runs/<run>/simulate/logs
      tables/<table>.parquet              the filtered logs: the five log tables, labels (derived from the
                                          unfiltered logs), weights, target_flags; partitions.json (the
                                          user partitions' row ranges, so `build` streams them)
      dropped.parquet                     every dropped item: filter, unit, id, user_id, reason
      funnel.json, funnel.png             what each filter kept and dropped
      precision_recall.json               on simulated logs: each filter against the ground truth
      metrics.jsonl, manifest.json
    runs/<run>/build/                     reads runs/<run>/filter/tables
      sft.parquet, dpo.parquet, distill.parquet, rm/<signal>/{train,eval}.parquet
      build_report.json, metrics.jsonl, manifest.json

One recipe (e.g. `recipes/logs.toml`) can hold every stage's section; each stage reads its own
section and hashes only that, so changing `[build]` never re-runs the filters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import Field

from alignloop.data.builders import BuildConfig, build_datasets
from alignloop.data.filters import (
    DROPPED,
    FILTERED_SCHEMAS,
    TABLE_ORDER,
    FilterConfig,
    auto_partitions,
    filter_precision_recall,
    funnel_plot,
    run_filters,
    run_filters_on_disk,
    to_arrow,
)
from alignloop.data.io import read_logs, read_tables, write_tables
from alignloop.data.parts import PartitionedWriter, count_rows
from alignloop.errors import AlignloopError
from alignloop.recipes import Section, load_recipe
from alignloop.runs import Stage, atomic_write_json, default_run_name
from alignloop.sections import RunSection
from alignloop.ui import say, status


class FilterSection(FilterConfig):
    source: str = Field("auto", description="auto (ingest/tables, else simulate/logs), ingest, simulate, or a folder")
    ground_truth: str = Field("auto", description="auto (simulate/ground_truth if present), none, or a folder")


class LogsRecipe(Section):
    """Every section of the log pipeline; each stage uses its own (others pass through unchecked here)."""

    run: RunSection = RunSection()
    simulate: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] = Field(default_factory=dict)
    ingest: dict[str, Any] = Field(default_factory=dict)
    filter: FilterSection = FilterSection()
    build: BuildConfig = BuildConfig()


_SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe value: section.key=value (repeatable).")]
_RecipeArg = Annotated[Path, typer.Argument(help="A log pipeline recipe (TOML), e.g. recipes/logs.toml.")]
_RunOption = Annotated[str | None, typer.Option(help="Run folder name (overrides run.name).")]
_ForceOption = Annotated[bool, typer.Option(help="Re-run even if inputs and config are unchanged.")]
_EngineOption = Annotated[str, typer.Option(
    help="polars: partitions one after another in this process; ray: mapped over Ray Data (a local Ray "
         "unless RAY_ADDRESS names a cluster). Same outputs either way.")]


def filter_command(recipe: _RecipeArg, set_: _SetOption = None, run: _RunOption = None,
                   force: _ForceOption = False, engine: _EngineOption = "polars") -> None:
    """Filter logs (bots, skimmers, repeats, quality, diversity, per-user cap): runs/<run>/filter/."""
    run_filter_stage(load_recipe(recipe, LogsRecipe, set_ or []), run=run, force=force, engine=engine)


def build_command(recipe: _RecipeArg, set_: _SetOption = None, run: _RunOption = None,
                  force: _ForceOption = False, engine: _EngineOption = "polars") -> None:
    """Build SFT, DPO, reward-model and distillation sets from filtered logs: runs/<run>/build/."""
    run_build_stage(load_recipe(recipe, LogsRecipe, set_ or []), run=run, force=force, engine=engine)


def check_engine(engine: str) -> None:
    from alignloop.data.ray_engine import ENGINES, ray_available

    if engine not in ENGINES:
        raise AlignloopError(f"--engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    if engine == "ray" and not ray_available():
        raise AlignloopError('--engine ray needs Ray Data: pip install "alignloop[ray]"')


# --- stages ------------------------------------------------------------------------------------


def _table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl"))


def source_folder(recipe: LogsRecipe, run: str) -> Path:
    base = Path(recipe.run.dir) / run
    choice = recipe.filter.source
    candidates = {"ingest": base / "ingest" / "tables", "simulate": base / "simulate" / "logs"}
    if choice == "auto":
        for folder in candidates.values():
            if folder.is_dir() and _table_files(folder):
                return folder
        raise AlignloopError(f"no logs to filter in {base}: run `alignloop logs simulate` or `logs ingest` first")
    folder = candidates.get(choice, Path(choice))
    if not folder.is_dir():
        raise AlignloopError(f"filter.source: no such folder {folder}")
    return folder


def truth_folder(recipe: LogsRecipe, run: str, source: Path) -> Path | None:
    choice = recipe.filter.ground_truth
    if choice == "none":
        return None
    if choice == "auto":
        folder = Path(recipe.run.dir) / run / "simulate" / "ground_truth"
        # Ground truth only describes simulated logs read as simulated (not a later ingest of other data).
        return folder if folder.is_dir() and source.parent.name == "simulate" else None
    folder = Path(choice)
    if not folder.is_dir():
        raise AlignloopError(f"filter.ground_truth: no such folder {folder}")
    return folder


def run_filter_stage(recipe: LogsRecipe, run: str | None = None, force: bool = False, engine: str = "polars"
                     ) -> Stage:
    """The filter stage. Both engines give the same files; the engine is not part of the config
    hash (switching engines never re-runs a finished stage)."""
    check_engine(engine)
    run_name = run or recipe.run.name or default_run_name()
    source = source_folder(recipe, run_name)
    truth_dir = truth_folder(recipe, run_name, source)
    inputs = _table_files(source) + (_table_files(truth_dir) if truth_dir else [])
    config = {"filter": recipe.filter.model_dump(mode="json"), "source": str(source)}
    stage = Stage(recipe.run.dir, run_name, "filter", config, inputs=inputs)
    if not force and stage.is_complete():
        say(f"[green]filter: up to date[/] ({stage.dir}), skipped")
        return stage
    stage.start()
    partitions = recipe.filter.partitions or auto_partitions(count_rows(source), recipe.filter.events_per_partition)
    tables_dir = stage.path("tables")
    with status(f"filtering {source}" + (f" in {partitions} partitions" if partitions > 1 else "")
                + (" on Ray" if engine == "ray" else "")):
        if engine == "ray":
            from alignloop.data.ray_engine import run_filters_ray

            files, report = run_filters_ray(source, tables_dir, recipe.filter, partitions, work_dir=stage.dir,
                                            keep_inputs=truth_dir is not None)
        elif partitions == 1:  # all in memory: fastest
            filtered, report = run_filters(read_logs(source), recipe.filter, keep_inputs=truth_dir is not None)
            with PartitionedWriter(tables_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
                writer.write(to_arrow(filtered))
            files = writer.close()
            del filtered
        else:  # streamed: one user partition in memory at a time
            files, report = run_filters_on_disk(source, tables_dir, recipe.filter, partitions,
                                                work_dir=stage.dir, keep_inputs=truth_dir is not None)
        dropped = write_tables(stage.dir, {"dropped": report.dropped.to_arrow()}, {"dropped": DROPPED})
        png = funnel_plot(report, stage.path("funnel.png"))
    summary = report.to_dict()
    outputs = [*files, *dropped, png]
    for f in report.filters:
        stage.log_metrics(filter=f.name, unit=f.unit, input=f.input, kept=f.kept, dropped=f.dropped,
                          weighted=f.weighted, seconds=f.seconds, reasons=f.reasons)
    pr = None
    if truth_dir is not None:
        from alignloop.sim.truth import TRUTH_SCHEMAS

        pr = filter_precision_recall(report, read_tables(truth_dir, TRUTH_SCHEMAS))
        atomic_write_json(stage.path("precision_recall.json"), pr)
        outputs.append(stage.path("precision_recall.json"))
        stage.log_metrics(**{f"{name}_{k}": v[k] for name, v in pr.items() for k in ("precision", "recall")})
    atomic_write_json(stage.path("funnel.json"), {**summary, "precision_recall": pr})
    outputs.append(stage.path("funnel.json"))
    stage.log_metrics(seconds=round(report.seconds, 3), **{f"rows_{k}": v for k, v in report.output_rows.items()})
    stage.finish(outputs, extra={"rows_in": report.input_rows, "rows_out": report.output_rows,
                                 "filters": summary["filters"], "precision_recall": pr, "engine": engine,
                                 "allocators": allocator_settings()})
    say(report.summary())
    if pr:
        for name, v in pr.items():
            target = ""
            if "target" in v:
                met = "[green]met[/]" if v["meets_target"] else "[bold red]NOT met[/]"
                target = f"; target >= {v['target']['precision']} / >= {v['target']['recall']}: {met}"
            say(f"{name}: precision {_fmt(v['precision'])}, recall {_fmt(v['recall'])} (vs ground truth{target})")
    say(f"[green]filter: {report.input_rows['events']:,} -> {report.output_rows['events']:,} events[/] "
        f"in {report.seconds:.2f}s -> {stage.dir}")
    return stage


def run_build_stage(recipe: LogsRecipe, run: str | None = None, force: bool = False, engine: str = "polars"
                    ) -> Stage:
    check_engine(engine)
    run_name = run or recipe.run.name or default_run_name()
    tables = Path(recipe.run.dir) / run_name / "filter" / "tables"
    if not tables.is_dir():
        raise AlignloopError(f"no filtered logs in {tables}: run `alignloop logs filter` first")
    config = {"build": recipe.build.model_dump(mode="json")}
    stage = Stage(recipe.run.dir, run_name, "build", config, inputs=_table_files(tables))
    if not force and stage.is_complete():
        say(f"[green]build: up to date[/] ({stage.dir}), skipped")
        return stage
    stage.start()
    with status(f"building datasets from {tables}" + (" on Ray" if engine == "ray" else "")):
        if engine == "ray":
            from alignloop.data.ray_engine import build_datasets_ray

            report = build_datasets_ray(tables, recipe.build, stage.dir, work_dir=stage.dir)
        else:
            report = build_datasets(tables, recipe.build, stage.dir)
    for name, d in report.datasets.items():
        stage.log_metrics(dataset=name, **d)
    stage.log_metrics(seconds=round(report.seconds, 3), skipped=report.skipped)
    atomic_write_json(stage.path("build_report.json"), report.to_dict())
    stage.finish([*report.files, stage.path("build_report.json")], extra={"datasets": report.datasets,
                                                                          "skipped": report.skipped,
                                                                          "engine": engine,
                                                                          "allocators": allocator_settings()})
    say(report.summary())
    say(f"[green]build: {sum(d['rows'] for d in report.datasets.values()):,} examples[/] "
        f"in {report.seconds:.2f}s -> {stage.dir}")
    return stage


def allocator_settings() -> dict[str, str | None]:
    """The allocator settings this process runs with (memory depends on them; see `alignloop.cli`)."""
    import os

    return {k: os.environ.get(k) for k in ("_RJEM_MALLOC_CONF", "MIMALLOC_PURGE_DELAY")}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["FilterSection", "LogsRecipe", "build_command", "filter_command", "run_build_stage", "run_filter_stage"]
