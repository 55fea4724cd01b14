"""`alignloop logs ingest`: validate log files into `runs/<run>/ingest/`, quarantining bad rows.

    runs/<run>/ingest/
      tables/<table>.parquet   the five log tables (what earlier ingests of this run put there, plus
                               what this one added: re-running is idempotent, `--fresh` starts over)
      quarantine.jsonl         this ingest's bad rows: table, source, line, kind, reason, raw
      ingest_report.json       this ingest's counts
      metrics.jsonl            one line of counts per ingest into this run
      manifest.json            config, input hashes, output hashes, counts
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignloop.data.ingest import QUARANTINE, REPORT, TABLES, IngestReport, ingest, input_files
from alignloop.errors import AlignloopError
from alignloop.runs import Stage, default_run_name
from alignloop.ui import console, say, status

STAGE = "ingest"


def ingest_command(
    inputs: Annotated[Optional[list[Path]], typer.Argument(
        help="JSONL or Parquet files, or log folders (<table>.parquet / <table>.jsonl).", show_default=False)] = None,
    chitchat: Annotated[bool, typer.Option(
        "--chitchat", help="Also ingest the chitchat-dataset package's conversations (pip install chitchat-dataset).")
    ] = False,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Start from empty tables instead of adding to what this run already ingested.")] = False,
) -> None:
    """Validate log rows into conformed tables; every bad row goes to quarantine.jsonl with its reason."""
    run_ingest(list(inputs or []), chitchat=chitchat, run=run, runs_dir=runs_dir, fresh=fresh)


def run_ingest(inputs: list[Path], *, chitchat: bool = False, run: str | None = None, runs_dir: Path = Path("runs"),
               fresh: bool = False) -> tuple[Stage, IngestReport]:
    if not inputs and not chitchat:
        raise AlignloopError("nothing to ingest: give input files or folders, or --chitchat")
    sources = input_files(inputs)  # fails early, with one line, on a missing or unknown input
    config: dict = {"inputs": [str(p) for p in inputs], "chitchat": chitchat, "fresh": fresh}
    with tempfile.TemporaryDirectory(prefix="alignloop-chitchat-") as tmp:
        if chitchat:
            from alignloop.data.adapters.chitchat import dataset_path, write_chitchat

            sources.append(dataset_path())
            config["chitchat_version"] = importlib.metadata.version("chitchat-dataset")
            with status("converting the chitchat dataset"):
                write_chitchat(Path(tmp) / "chitchat")
            inputs = [*inputs, Path(tmp) / "chitchat"]
        stage = Stage(runs_dir, run or default_run_name(), STAGE, config, inputs=sources).start()
        tables = stage.path("tables")
        existing = tables if not fresh and any(tables.glob("*.parquet")) else None
        with status(f"ingesting {len(inputs)} input(s)"):
            report = ingest(inputs, tables, existing=existing, quarantine=stage.path(QUARANTINE),
                            report_path=stage.path(REPORT))
    summary = report.to_dict()
    stage.log_metrics(**{f"{name}_{k}": v for name, c in summary["counts"].items() for k, v in c.items()},
                      **{f"total_{k}": v for k, v in summary["total"].items()},
                      seconds=summary["seconds"], rows_per_second=summary["rows_per_second"])
    stage.finish([*(tables / f"{name}.parquet" for name in TABLES), stage.path(QUARANTINE), stage.path(REPORT)],
                 extra={"counts": summary["counts"], "total": summary["total"], "reasons": summary["reasons"],
                        "rows_after": summary["totals_after"], "appended_to_existing": existing is not None})
    console.print(report.rich_table(title=f"ingest -> {stage.dir}"))
    if report.total.quarantined:
        reasons = ", ".join(f"{n:,} {kind}" for kind, n in report.reasons.items())
        say(f"[yellow]{report.total.quarantined:,} row(s) quarantined[/] ({reasons}) -> {stage.path(QUARANTINE)}")
    say(f"{report.total.read:,} rows in {report.seconds:.2f}s ({report.rows_per_second:,.0f} rows/s)")
    return stage, report
