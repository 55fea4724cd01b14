"""The log pipeline's stages: ingest, filter and build (the CLI's `alignloop logs ...` calls these).

    runs/<run>/ingest/
      tables/<table>.parquet   the five log tables (what earlier ingests of this run put there, plus
                               what this one added: re-running is idempotent, `fresh` starts over)
      quarantine.jsonl         every ingest's bad rows (each appends its own, even with `fresh`):
                               ingest, table, source, line, kind, reason, raw
      ingest_report.json       this ingest's counts, its id, and the quarantine's total
    runs/<run>/filter/                    reads runs/<run>/ingest/tables, else runs/<run>/simulate/logs
      tables/<table>.parquet              the filtered logs: the five log tables, labels (derived from the
                                          unfiltered logs), weights, target_flags; partitions.json (the
                                          user partitions' row ranges, so `build` streams them)
      dropped.parquet                     every dropped item: filter, unit, id, user_id, reason
      funnel.json, funnel.png             what each filter kept and dropped
      precision_recall.json               on simulated logs: each filter against the ground truth
    runs/<run>/build/                     reads runs/<run>/filter/tables
      sft.parquet, dpo.parquet, distill.parquet, rm/<signal>/{train,eval}.parquet
      build_report.json

Each folder also holds metrics.jsonl and, once finished, manifest.json (see `alignloop.runs`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Literal

from rich.markup import escape

from alignloop import freed_memory
from alignloop.data.adapters.chitchat import dataset_path, write_chitchat
from alignloop.data.adapters.detect import convert, export_files, known_users, split_inputs
from alignloop.data.builders import build_datasets, builds_streamed
from alignloop.data.config import LogsRecipe
from alignloop.data.filters import DROPPED, auto_partitions, filter_precision_recall, funnel_plot, read_ground_truth
from alignloop.data.ingest import QUARANTINE, REPORT, TABLES, IngestReport, ingest, input_files
from alignloop.data.io import write_tables
from alignloop.data.parts import count_rows
from alignloop.data.ray_engine import ENGINES, build_datasets_ray, filter_logs, ray_available
from alignloop.errors import AlignloopError
from alignloop.runs import Stage, atomic_write_json, default_run_name
from alignloop.ui import console, say, status


def run_ingest(inputs: list[Path], *, chitchat: bool = False, run: str | None = None, runs_dir: Path = Path("runs"),
               fresh: bool = False, format: str = "auto") -> tuple[Stage, IngestReport]:
    """The ingest stage: `inputs` (and with `chitchat` the chitchat dataset) into `runs/<run>/ingest/tables`.

    Never skipped: ingesting the same rows again adds nothing (`fresh` starts from empty tables).
    `format`: how to read `inputs` (`alignloop.data.adapters.detect`: auto, logs, openai, sharegpt, table).
    Returns the finished stage and the ingest's counts.
    """
    native, exports, sources, config = _ingest_plan(inputs, chitchat, fresh, format)
    with tempfile.TemporaryDirectory(prefix="alignloop-chitchat-") as tmp:
        if chitchat:
            with status("converting the chitchat dataset"):
                write_chitchat(Path(tmp) / "chitchat")
            native = [*native, Path(tmp) / "chitchat"]
        stage = Stage(runs_dir, run or default_run_name(), "ingest", config, inputs=sources).start()
        tables = stage.path("tables")
        existing = tables if not fresh and any(tables.glob("*.parquet")) else None
        with status(f"ingesting {len(native) + len(exports)} input(s)"):
            report = ingest(native, tables, existing=existing, quarantine=stage.path(QUARANTINE),
                            report_path=stage.path(REPORT), converted=convert(exports, known_users(existing)))
    summary = report.to_dict()
    stage.log_metrics(**{f"{name}_{k}": v for name, c in summary["counts"].items() for k, v in c.items()},
                      **{f"total_{k}": v for k, v in summary["total"].items()},
                      seconds=summary["seconds"], rows_per_second=summary["rows_per_second"])
    stage.finish([*(tables / f"{name}.parquet" for name in TABLES), stage.path(QUARANTINE), stage.path(REPORT)],
                 extra={"counts": summary["counts"], "total": summary["total"], "reasons": summary["reasons"],
                        "rows_after": summary["totals_after"], "appended_to_existing": existing is not None,
                        "ingest_id": report.ingest_id, "quarantine_total": report.quarantine_total})
    console.print(report.rich_table(title=f"ingest -> {stage.dir}"))
    if report.total.quarantined:
        reasons = ", ".join(f"{n:,} {kind}" for kind, n in report.reasons.items())
        say(f"[yellow]{report.total.quarantined:,} row(s) quarantined[/] ({reasons}) -> {stage.path(QUARANTINE)} "
            f"({report.quarantine_total:,} from every ingest of this run)")
    say(f"{report.total.read:,} rows in {report.seconds:.2f}s ({report.rows_per_second:,.0f} rows/s)")
    return stage, report


def _ingest_plan(inputs: list[Path], chitchat: bool, fresh: bool, format: str
                 ) -> tuple[list[Path], list, list[Path], dict]:
    """(native inputs, exports, every source file, the stage's config) of an ingest."""
    if not inputs and not chitchat:
        raise AlignloopError("nothing to ingest: give input files or folders, or --chitchat")
    native, exports = split_inputs(inputs, format)  # fails early, with one line, on an unknown format
    sources = [*input_files(native), *(f for path, _ in exports for f in export_files(path))]
    config: dict = {"inputs": [str(p) for p in inputs], "chitchat": chitchat, "fresh": fresh, "format": format}
    if chitchat:
        sources.append(dataset_path())
        config["chitchat_version"] = importlib.metadata.version("chitchat-dataset")
    return native, exports, sources, config


def run_ingest_stage(inputs: list[Path], *, chitchat: bool = False, run: str, runs_dir: Path = Path("runs"),
                     format: str = "auto", force: bool = False) -> Stage:
    """Ingest as a stage of a pipeline (the flywheel): fresh tables from exactly these sources, and
    skipped when the same sources were ingested the same way already, so that a re-run or a resumed
    run neither converts everything again nor adds an ingest on top of the last one."""
    _, _, sources, config = _ingest_plan(inputs, chitchat, True, format)
    stage = Stage(runs_dir, run, "ingest", config, inputs=sources)
    if not force and stage.is_complete():
        say(f"[green]ingest: up to date[/] ({stage.dir}), skipped")
        return stage
    return run_ingest(inputs, chitchat=chitchat, run=run, runs_dir=runs_dir, fresh=True, format=format)[0]


def check_engine(engine: str) -> None:
    """Fails with one line on an unknown engine, or on Ray when Ray Data is not installed."""
    if engine not in ENGINES:
        raise AlignloopError(f"--engine must be one of {', '.join(ENGINES)}, not '{engine}'")
    if engine == "ray" and not ray_available():
        raise AlignloopError('--engine ray needs Ray Data: pip install "alignloop[ray]"')


def _table_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".parquet", ".jsonl"))


def source_folder(recipe: LogsRecipe, run: str) -> Path:
    """The log folder `filter.source` names (auto: this run's ingested tables, else its simulated logs)."""
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
    """The ground-truth folder `filter.ground_truth` names, or None: the filters are then not scored."""
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


def filter_partitions(recipe: LogsRecipe, source: Path) -> int:
    """User partitions the filter stage cuts `source` into (1: it is filtered in memory)."""
    return recipe.filter.partitions or auto_partitions(count_rows(source), recipe.filter.events_per_partition)


def filtered_tables(recipe: LogsRecipe, run: str) -> Path:
    """The filter stage's tables of this run, which the build stage reads."""
    return Path(recipe.run.dir) / run / "filter" / "tables"


def streamed(recipe: LogsRecipe, run: str | None, stage: Literal["filter", "build"]) -> bool:
    """Whether the `filter` or `build` stage of this run will stream its logs through user partitions
    on disk (one in memory at a time) rather than hold them in memory. False when it cannot tell
    yet (the stage then fails with its own error)."""
    run_name = run or recipe.run.name or default_run_name()
    try:
        if stage == "filter":
            return filter_partitions(recipe, source_folder(recipe, run_name)) > 1
        return builds_streamed(filtered_tables(recipe, run_name))
    except (AlignloopError, OSError):
        return False


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
    if stage.skip_if_complete(force):
        return stage
    partitions = filter_partitions(recipe, source)
    tables_dir = stage.path("tables")
    with status(f"filtering {source}" + (f" in {partitions} partitions" if partitions > 1 else "")
                + (" on Ray" if engine == "ray" else "")):
        files, report = filter_logs(source, tables_dir, recipe.filter, partitions, engine,
                                    keep_inputs=truth_dir is not None, work_dir=stage.dir)
        dropped = write_tables(stage.dir, {"dropped": report.dropped.to_arrow()}, {"dropped": DROPPED})
        png = funnel_plot(report, stage.path("funnel.png"))
    summary = report.to_dict()
    outputs = [*files, *dropped, png]
    for f in report.filters:
        stage.log_metrics(filter=f.name, unit=f.unit, input=f.input, kept=f.kept, dropped=f.dropped,
                          weighted=f.weighted, seconds=f.seconds, reasons=f.reasons, out_of_scope=f.out_of_scope)
    pr = None
    if truth_dir is not None:
        pr = filter_precision_recall(report, read_ground_truth(truth_dir))
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
    """The build stage: every enabled dataset from this run's filtered tables into `runs/<run>/build/`.
    Like the filter stage, the engine changes neither the files nor the config hash."""
    check_engine(engine)
    run_name = run or recipe.run.name or default_run_name()
    tables = filtered_tables(recipe, run_name)
    if not tables.is_dir():
        raise AlignloopError(f"no filtered logs in {tables}: run `alignloop logs filter` first")
    config = {"build": recipe.build.model_dump(mode="json")}
    stage = Stage(recipe.run.dir, run_name, "build", config, inputs=_table_files(tables))
    if stage.skip_if_complete(force):
        with contextlib.suppress(OSError, ValueError):  # a build from before notes were kept has none
            say_notes(json.loads(stage.path("build_report.json").read_text(encoding="utf-8")).get("notes", []))
        return stage
    with status(f"building datasets from {tables}" + (" on Ray" if engine == "ray" else "")):
        if engine == "ray":
            report = build_datasets_ray(tables, recipe.build, stage.dir, work_dir=stage.dir)
        else:
            report = build_datasets(tables, recipe.build, stage.dir)
    for name, d in report.datasets.items():
        stage.log_metrics(dataset=name, **d)
    stage.log_metrics(seconds=round(report.seconds, 3), skipped=report.skipped)
    atomic_write_json(stage.path("build_report.json"), report.to_dict())
    stage.finish([*report.files, stage.path("build_report.json")], extra={"datasets": report.datasets,
                                                                          "skipped": report.skipped,
                                                                          "notes": report.notes,
                                                                          "engine": engine,
                                                                          "allocators": allocator_settings()})
    say(report.summary())
    say_notes(report.notes)
    say(f"[green]build: {sum(d['rows'] for d in report.datasets.values()):,} examples[/] "
        f"in {report.seconds:.2f}s -> {stage.dir}")
    return stage


def say_notes(notes: list[dict[str, str]]) -> None:
    """The build's lines on the SFT source and on datasets it could not fill (`dataset_writer.explain`):
    one line each however narrow the terminal, escaped (they quote recipe keys and values, which
    rich would read as markup)."""
    for note in notes:
        line = escape(note["line"])
        console.print(line if note["kind"] == "choice" else f"[yellow]{line}[/]", soft_wrap=True)


def allocator_settings() -> dict[str, str | None]:
    """The allocator settings this process runs with (speed and memory depend on them; see
    `alignloop.freed_memory`)."""
    return freed_memory.settings()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
