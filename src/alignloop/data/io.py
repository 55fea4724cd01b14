"""Reading and writing log folders: one file per table, Parquet (`<table>.parquet`) or JSONL (`<table>.jsonl`).

Writes are atomic per file (`alignloop.runs.atomic_path`): a crash leaves the previous file or
none, never half of one. `TableWriter` appends chunk by chunk (one Parquet row group, or a run of
JSONL lines, per chunk), so a simulation or a filter can stream more rows than fit in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import polars as pl
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from alignloop.data.schema import LOG_SCHEMAS, SCHEMAS, SchemaError, conform
from alignloop.runs import atomic_path

Format = Literal["parquet", "jsonl"]
FORMATS: tuple[str, ...] = ("parquet", "jsonl")
_SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl"}


class TableWriter:
    """Write tables of `schemas` into `folder`, chunk by chunk; each file appears atomically on close.

    Every schema gets a file, empty if no rows came. Leaving the `with` block through an exception
    discards everything written, and files from an earlier write stay as they were.
    """

    def __init__(self, folder: str | Path, schemas: Mapping[str, pa.Schema] = SCHEMAS,
                 format: Format = "parquet", compression: str = "zstd", only: Iterable[str] | None = None):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.folder = Path(folder)
        self.schemas = dict(schemas)
        self.format = format
        self.compression = compression
        self.names = list(only) if only is not None else list(schemas)
        self.rows = dict.fromkeys(self.names, 0)
        self._stack = contextlib.ExitStack()
        self._tmp: dict[str, Path] = {}
        self._sinks: dict[str, pq.ParquetWriter | IO[bytes]] = {}
        self._closed = False

    def path(self, name: str) -> Path:
        return self.folder / f"{name}{_SUFFIX[self.format]}"

    def __enter__(self) -> TableWriter:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            self._tmp[name] = self._stack.enter_context(atomic_path(self.path(name)))
        return self

    def write(self, tables: Mapping[str, pa.Table]) -> None:
        """Append one chunk; tables are conformed to their schema first (extra columns are an error)."""
        for name, table in tables.items():
            if name not in self._tmp:
                raise SchemaError(f"this writer writes {self.names}, not '{name}'")
            table = conform(name, table, self.schemas)
            if table.num_rows == 0:
                continue
            self._sink(name)
            if self.format == "parquet":
                self._sinks[name].write_table(table, row_group_size=1 << 20)
            else:
                _write_jsonl(table, self._sinks[name])
            self.rows[name] += table.num_rows

    def close(self) -> list[Path]:
        """Finish every file and move it into place; returns their paths."""
        if not self._closed:
            for name in self.names:
                self._sink(name)  # a table with no rows still gets its (empty) file
            for sink in self._sinks.values():
                sink.close()
            self._stack.close()
            self._closed = True
        return [self.path(name) for name in self.names]

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        for sink in self._sinks.values():
            with contextlib.suppress(Exception):
                sink.close()
        self._stack.__exit__(kind, exc, tb)  # atomic_path drops the temporary files
        self._closed = True

    def _sink(self, name: str) -> None:
        if name in self._sinks:
            return
        if self.format == "parquet":
            self._sinks[name] = pq.ParquetWriter(self._tmp[name], self.schemas[name], compression=self.compression)
        else:
            self._sinks[name] = open(self._tmp[name], "wb")


def _write_jsonl(table: pa.Table, sink: IO[bytes]) -> None:
    # Polars writes timestamps as ISO 8601 with the UTC offset, which pyarrow's reader parses back.
    pl.from_arrow(table).write_ndjson(sink)


def write_tables(folder: str | Path, tables: Mapping[str, pa.Table], schemas: Mapping[str, pa.Schema] = SCHEMAS,
                 format: Format = "parquet") -> list[Path]:
    """Write whole tables (each must be in `schemas`); returns the files written."""
    with TableWriter(folder, schemas, format, only=list(tables)) as writer:
        writer.write(tables)
    return writer.close()


def read_table(path: str | Path, name: str, schemas: Mapping[str, pa.Schema] = SCHEMAS) -> pa.Table:
    """One table file (.parquet or .jsonl), conformed to schema `name`."""
    path = Path(path)
    schema = schemas[name]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix == ".jsonl":
        table = read_jsonl(path, schema)
    else:
        raise SchemaError(f"{path}: expected a .parquet or .jsonl file")
    return conform(name, table, schemas)


def read_jsonl(path: str | Path, schema: pa.Schema, unexpected: Literal["error", "ignore"] = "error") -> pa.Table:
    """A JSONL file parsed to the types of `schema`, every column nullable (`conform` checks the
    nulls). A field outside the schema is an error, or with `unexpected="ignore"` left out."""
    relaxed = pa.schema([f.with_nullable(True) for f in schema])
    if Path(path).stat().st_size == 0:
        return relaxed.empty_table()
    return pajson.read_json(
        path,
        read_options=pajson.ReadOptions(block_size=16 << 20),
        parse_options=pajson.ParseOptions(explicit_schema=relaxed, unexpected_field_behavior=unexpected),
    )


def read_tables(folder: str | Path, schemas: Mapping[str, pa.Schema] = SCHEMAS) -> dict[str, pa.Table]:
    """Every table of `schemas` found in `folder` (Parquet preferred over JSONL when both exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    found = {}
    for name in schemas:
        for suffix in (".parquet", ".jsonl"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                found[name] = read_table(path, name, schemas)
                break
    return found


def write_logs(folder: str | Path, tables: Mapping[str, pa.Table], format: Format = "parquet") -> list[Path]:
    """Write log tables (any of users, sessions, conversations, turns, events, labels) into `folder`."""
    return write_tables(folder, tables, SCHEMAS, format)


def read_logs(folder: str | Path) -> dict[str, pa.Table]:
    """The log tables in `folder`; the five log tables must all be there, labels are optional."""
    tables = read_tables(folder, SCHEMAS)
    missing = [name for name in LOG_SCHEMAS if name not in tables]
    if missing:
        raise FileNotFoundError(f"{folder}: missing log table(s) {missing}")
    return tables
