"""Ingest: log rows from JSONL or Parquet into one conformed log folder; every bad row is quarantined.

    report = ingest([Path("logs/day1.jsonl"), Path("export/")], Path("clean"), existing=Path("clean"))

Inputs, any mix of:
  - a JSONL file named `<table>.jsonl` (users, sessions, conversations, turns, events): one row of
    that table per line; a line may carry `"table": "<table>"`, which must then match;
  - any other JSONL file: every line names its table, `{"table": "events", "event_id": ..., ...}`;
  - a Parquet file named `<table>.parquet`;
  - a folder in the schema's layout (`<table>.parquet` or `<table>.jsonl`; Parquet preferred when
    both are there, as in `alignloop.data.io`); other files in it are ignored;
  - (`converted`) rows that an adapter made from a chat export (`alignloop.data.adapters`), each
    tagged with the export's file and line, so their quarantine records point into the export; an
    export record that made no rows counts as one conversation read and quarantined.

Every row ends in exactly one of three places, per table: `ingested + quarantined + duplicates ==
read`, always (blank lines are not rows; a line whose table cannot be told is counted under the
table `unknown`). A row is quarantined, with a one-line reason, when
  - it is not JSON, or is the cut-off last line of a file a killed writer left behind;
  - it does not fit its table's row model (`alignloop.data.schema.ROW_MODELS`): missing or unknown
    fields, wrong types, empty ids, unknown role or event type, unparseable timestamps, an event
    value that does not fit its type, ... JSONL is judged strictly ("3" is not an int, a timestamp
    needs its UTC offset); Parquet columns are cast to the schema's types as `alignloop.data.io`
    does (a naive timestamp column is UTC), and what cannot be cast is judged row by row;
  - its primary id is already known, in `existing` or earlier in this batch, with other content;
  - a JSONL line names one key twice (JSON parsers keep the last; which one the logger meant is
    unknown);
  - a value is well-typed but implausible (`alignloop.data.schema.Plausible`): a timestamp before
    2000-01-01 or later than a day after the ingest began, a swipe/select or candidate index
    above 1000;
  - it points at a row that is neither in this batch nor in `existing` (a dangling reference: a
    session's user, a conversation's session and user, a turn's conversation and parent, an
    event's user, session, conversation and turn). This cascades: the turns and events of a
    quarantined conversation are quarantined too;
  - it happened before the user, session or conversation it belongs to began (`schema.STARTS`;
    an event before its conversation's `started_at`, ...); this cascades like a dangling reference.
A row whose primary id is already known with the same content is a duplicate: counted, not written
again, so re-ingesting the same logs changes nothing.

Output: `out_dir/<table>.parquet` for the five log tables, each the rows of `existing` followed by
the newly ingested rows in input order, conformed and written atomically per file;
`quarantine.jsonl` (one JSON object per bad row: ingest, table, source, line, kind, reason, raw;
`line` is the 1-based line of a JSONL file or the 1-based row of a Parquet file), to which every
ingest appends its own rows, tagged with its `ingest` id, so no ingest's bad rows are lost; and
`ingest_report.json` (this ingest's counts, its id, and `quarantine_total`: the records the
quarantine file now holds, every earlier ingest's included). `out_dir` may be `existing` itself:
ingesting into a folder adds to it. Derived labels are not touched; re-derive them after ingesting.

How it is fast: each JSONL line is parsed and type-checked by pydantic-core straight from its bytes
against a TypedDict with the row model's fields (no Python per field); chunks of 64k good lines
become Arrow tables, on which the row models' own validators (cross-field rules) run column-wise in
Polars (`column_problems`). Parquet inputs get only the column-wise checks. Either way the row
model itself words the reason for the few rows that fail. Duplicates and references are resolved
column-wise in Polars. About 100k-200k JSONL rows/s and 300k-400k Parquet rows/s on one CPU core.
"""

from __future__ import annotations

import codecs
import json
import re
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types as at
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from rich.table import Table
from typing_extensions import NotRequired, TypedDict

from alignloop.data.io import read_tables, write_logs
from alignloop.data.schema import (LOG_SCHEMAS, ROW_MODELS, STARTS, TIMESTAMP, WHEN, Plausible, SchemaError, conform,
                                   utc)
from alignloop.errors import AlignloopError
from alignloop.runs import atomic_path, atomic_write_json

TABLES: tuple[str, ...] = tuple(LOG_SCHEMAS)
UNKNOWN = "unknown"
"""The count bucket for lines whose table cannot be told (bad JSON in a mixed file, unknown table)."""

PRIMARY_KEYS: dict[str, str] = {name: schema.names[0] for name, schema in LOG_SCHEMAS.items()}

REFERENCES: dict[str, tuple[tuple[str, str], ...]] = {
    "users": (),
    "sessions": (("user_id", "users"),),
    "conversations": (("session_id", "sessions"), ("user_id", "users")),
    "turns": (("conversation_id", "conversations"), ("parent_id", "turns")),
    "events": (("user_id", "users"), ("session_id", "sessions"), ("conversation_id", "conversations"),
               ("turn_id", "turns")),
}
"""Per table, (column, table it points at) for the referential checks; null references are fine."""

# Quarantine kinds.
BAD_JSON = "bad JSON"
TRUNCATED = "truncated line"
INVALID = "invalid row"
UNKNOWN_TABLE = "unknown table"
CONFLICT = "conflicting id"
DANGLING = "dangling reference"
DUPLICATE_KEY = "duplicate key"
IMPLAUSIBLE_TIME = "implausible timestamp"
IMPLAUSIBLE_INDEX = "implausible index"
OUT_OF_ORDER = "out of order"

QUARANTINE = "quarantine.jsonl"
REPORT = "ingest_report.json"
CHUNK_ROWS = 65_536
_SRC, _LINE = "_src", "_line"  # where a candidate row came from: input index, 1-based line or row


class IngestError(AlignloopError):
    """An input that cannot be ingested at all (missing, unknown kind, unreadable Parquet)."""


# --- report ------------------------------------------------------------------------------------


@dataclass
class TableCounts:
    read: int = 0
    ingested: int = 0
    quarantined: int = 0
    duplicates: int = 0

    @property
    def balanced(self) -> bool:
        return self.ingested + self.quarantined + self.duplicates == self.read


@dataclass
class IngestReport:
    """What one `ingest` call did. `counts` has every log table (and `unknown` when it was needed)."""

    counts: dict[str, TableCounts]
    reasons: dict[str, int]
    """quarantined rows per kind (bad JSON, truncated line, invalid row, ...)"""
    inputs: list[str]
    out_dir: str
    quarantine: str
    existing: str | None
    seconds: float
    outputs: list[str] = field(default_factory=list)
    totals_after: dict[str, int] = field(default_factory=dict)
    """rows per table in `out_dir` after this ingest (existing + ingested)"""
    ingest_id: str = ""
    """this ingest's tag on its quarantine records (its UTC start time)"""
    quarantine_total: int = 0
    """records in the quarantine file after this ingest: earlier ingests' + this one's"""

    @property
    def total(self) -> TableCounts:
        t = TableCounts()
        for c in self.counts.values():
            t.read += c.read
            t.ingested += c.ingested
            t.quarantined += c.quarantined
            t.duplicates += c.duplicates
        return t

    @property
    def balanced(self) -> bool:
        return all(c.balanced for c in self.counts.values())

    @property
    def rows_per_second(self) -> float:
        return self.total.read / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {name: asdict(c) for name, c in self.counts.items()},
            "total": asdict(self.total),
            "reasons": dict(self.reasons),
            "inputs": self.inputs,
            "out_dir": self.out_dir,
            "quarantine": self.quarantine,
            "ingest_id": self.ingest_id,
            "quarantine_total": self.quarantine_total,
            "existing": self.existing,
            "totals_after": self.totals_after,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_per_second, 1) if self.seconds > 0 else None,
        }

    def rich_table(self, title: str = "ingest") -> Table:
        table = Table("table", "read", "ingested", "quarantined", "duplicates", "rows after", title=title)
        for name, c in self.counts.items():
            table.add_row(name, f"{c.read:,}", f"{c.ingested:,}", f"{c.quarantined:,}", f"{c.duplicates:,}",
                          f"{self.totals_after.get(name, 0):,}" if name != UNKNOWN else "")
        t = self.total
        table.add_row("[bold]total", f"[bold]{t.read:,}", f"[bold]{t.ingested:,}", f"[bold]{t.quarantined:,}",
                      f"[bold]{t.duplicates:,}", f"[bold]{sum(self.totals_after.values()):,}")
        return table


# --- row validation ----------------------------------------------------------------------------


def _line_dict(name: str, tag_required: bool) -> type:
    """A TypedDict with the fields of `name`'s row model (types, constraints) and a "table" tag.

    Validating lines against it runs entirely in pydantic-core (about 3x faster than building
    the model); the model's own validators, which are Python, run afterwards column-wise on each
    chunk (`column_problems`), so together they judge a row exactly as the row model does.
    """
    model = ROW_MODELS[name]
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        kind = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[field_name] = kind if info.is_required() else NotRequired[kind]  # default: `_rows_to_table`
    tag = Literal[name]  # type: ignore[valid-type]
    fields["table"] = tag if tag_required else NotRequired[tag]
    typed = TypedDict(f"{model.__name__}Line", fields)  # type: ignore[operator]
    typed.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return typed


_ONE_TABLE = {name: TypeAdapter(_line_dict(name, tag_required=False)) for name in TABLES}
_MIXED = TypeAdapter(Annotated[typing.Union[tuple(_line_dict(name, tag_required=True) for name in TABLES)],
                               Field(discriminator="table")])
_TABLE_TAG = re.compile(rb'"table"\s*:\s*"([^"\\]{0,40})"')


def _error_reason(e: ValidationError, tagged: bool) -> tuple[str, str]:
    """(quarantine kind, one-line reason) of a line that failed validation."""
    errors = e.errors(include_url=False)
    first = errors[0]
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    kind = first["type"]
    if kind == "json_invalid":
        return BAD_JSON, f"not JSON: {first['ctx']['error'] if 'ctx' in first else first['msg']}"
    if kind == "union_tag_not_found":
        return INVALID, 'no "table" key naming the table'
    if kind == "union_tag_invalid":
        tag = first.get("ctx", {}).get("tag", "?")
        return UNKNOWN_TABLE, f"unknown table '{tag}' (expected one of {', '.join(TABLES)})"
    if kind == "model_type" or kind == "model_attributes_type":
        return INVALID, "not a JSON object"
    loc = list(first["loc"])
    if tagged and loc:
        loc = loc[1:]  # the union's tag
    where = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "unexpected field"
    elif kind == "missing":
        msg = "missing"
    return INVALID, (f"{where}: {msg}" if where else msg) + more


def _row_model_reason(name: str, row: dict[str, Any]) -> str | None:
    """Why the row model rejects `row` (one line), or None if it accepts it."""
    try:
        ROW_MODELS[name].model_validate(row, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg
    return None


_MIRRORED_VALIDATORS = {"users": set(), "sessions": {"_ordered"}, "conversations": set(), "turns": {"_tree"},
                        "events": {"_value_fits_type"}}


def _column_checks(name: str) -> list[tuple[pl.Expr, str]] | None:
    """(expression true on bad rows, message) for table `name`, read off its row model; None if
    the model has a rule this mirror does not know (then its rows are judged by the model itself).

    Field constraints (required, min length, bounds, Literal choices) come from the model's field
    info; the model's own validators are mirrored below. `test_ingest` checks on random rows that
    these flag exactly the rows the model rejects.
    """
    model = ROW_MODELS[name]
    decorators = model.__pydantic_decorators__
    if {*decorators.model_validators, *decorators.field_validators} != _MIRRORED_VALIDATORS[name]:
        return None
    checks: list[tuple[pl.Expr, str]] = []
    for f in LOG_SCHEMAS[name]:
        c = pl.col(f.name)
        info = model.model_fields[f.name]
        if not f.nullable:
            checks.append((c.is_null(), f"{f.name}: required"))
        if typing.get_origin(info.annotation) is Literal:
            choices = list(typing.get_args(info.annotation))
            checks.append((c.is_not_null() & ~c.is_in(choices), f"{f.name}: not one of {choices}"))
        for meta in info.metadata:
            if isinstance(meta, at.MinLen):
                checks.append((c.str.len_chars() < meta.min_length, f"{f.name}: shorter than {meta.min_length}"))
            elif isinstance(meta, at.Ge):
                checks.append((c < meta.ge, f"{f.name}: below {meta.ge}"))
            elif isinstance(meta, at.Gt):
                checks.append((c <= meta.gt, f"{f.name}: not above {meta.gt}"))
            elif isinstance(meta, at.Le):
                checks.append((c > meta.le, f"{f.name}: above {meta.le}"))
            elif isinstance(meta, at.Lt):
                checks.append((c >= meta.lt, f"{f.name}: not below {meta.lt}"))
            else:  # a constraint this mirror does not know
                return None
    col = pl.col
    if name == "sessions":
        checks.append((col("ended_at") < col("started_at"), "ended_at is before started_at"))
    elif name == "turns":
        checks.append((col("parent_id") == col("turn_id"), "a turn cannot be its own parent"))
        checks.append(((col("role") == "user") & (col("candidate_index") != 0), "user turns have candidate_index 0"))
    elif name == "events":
        v, t = col("value"), col("type")
        checks += [
            (v.is_nan() | v.is_infinite(), "value must be finite"),
            ((t == "read") & (v.is_null() | (v < 0)), "read event: value must be seconds >= 0"),
            (t.is_in(["swipe", "select"]) & (v.is_null() | (v < 0) | (v != v.floor())),
             "swipe/select event: value must be a candidate index"),
            ((t == "vote") & (v.is_null() | ~v.is_in([1.0, -1.0, 0.0])), "vote event: value must be +1, -1 or 0"),
            (col("turn_id").is_null() & (t != "message"), "only message events may lack a turn_id"),
        ]
    return checks


_CHECKS = {name: _column_checks(name) for name in TABLES}


def column_problems(name: str, table: pa.Table) -> pl.Series:
    """Per row of `table` (conformed to `name`'s columns, nulls allowed): the first problem, or null."""
    checks = _CHECKS[name]
    if checks is None:  # rules the mirror does not know: ask the row model, row by row (slow, exact)
        return pl.Series("problem", [_row_model_reason(name, row) for row in table.to_pylist()], pl.String)
    df = _frame(table)
    expr = pl.lit(None, dtype=pl.String)
    for bad, message in reversed(checks):
        expr = pl.when(bad.fill_null(False)).then(pl.lit(message)).otherwise(expr)
    return df.select(expr.alias("problem")).to_series()


def _plausibility_checks(name: str, bounds: Plausible, latest: datetime) -> list[tuple[pl.Expr, str, pl.Expr]]:
    """(expression true on implausible rows, quarantine kind, reason) for table `name`."""
    checks = []
    for f in LOG_SCHEMAS[name]:
        if f.type != TIMESTAMP:
            continue
        c = pl.col(f.name)
        checks.append((c < bounds.earliest, IMPLAUSIBLE_TIME,
                       pl.format(f"{f.name}: {{}} is before {bounds.earliest:%Y-%m-%d}", _iso(c))))
        checks.append((c > latest, IMPLAUSIBLE_TIME,
                       pl.format(f"{f.name}: {{}} is in the future (after {latest:%Y-%m-%dT%H:%M}Z)", _iso(c))))
    top = bounds.max_candidate_index
    if name == "turns":
        checks.append((pl.col("candidate_index") > top, IMPLAUSIBLE_INDEX,
                       pl.format(f"candidate_index: {{}} is above {top}", pl.col("candidate_index"))))
    elif name == "events":
        checks.append((pl.col("type").is_in(["swipe", "select"]) & (pl.col("value") > top), IMPLAUSIBLE_INDEX,
                       pl.format(f"value: {{}} event to candidate {{}} (above {top})", pl.col("type"),
                                 pl.col("value"))))
    return checks


def _iso(c: pl.Expr) -> pl.Expr:
    return c.dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ")


def implausible(name: str, table: pa.Table, bounds: Plausible, latest: datetime) -> pl.DataFrame:
    """Per row of `table`: the `kind` and `reason` of its first implausible value, or nulls."""
    kind, reason = pl.lit(None, dtype=pl.String), pl.lit(None, dtype=pl.String)
    for bad, k, why in reversed(_plausibility_checks(name, bounds, latest)):
        kind = pl.when(bad.fill_null(False)).then(pl.lit(k)).otherwise(kind)
        reason = pl.when(bad.fill_null(False)).then(why).otherwise(reason)
    return _frame(table).select(kind.alias("kind"), reason.alias("reason"))


# --- reading inputs ----------------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    kind: Literal["jsonl", "parquet"]
    table: str | None  # None: a mixed JSONL file, each line names its table


def _sources(inputs: list[Path]) -> list[_Source]:
    found: list[_Source] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            hits = []
            for name in TABLES:
                for kind in ("parquet", "jsonl"):
                    if (path / f"{name}.{kind}").is_file():
                        hits.append(_Source(path / f"{name}.{kind}", kind, name))  # type: ignore[arg-type]
                        break
            if not hits:
                raise IngestError(f"{path}: no log tables in it (expected <table>.parquet or <table>.jsonl "
                                  f"for tables {', '.join(TABLES)})")
            found += hits
        elif path.is_file():
            if path.suffix == ".jsonl":
                found.append(_Source(path, "jsonl", path.stem if path.stem in LOG_SCHEMAS else None))
            elif path.suffix == ".parquet":
                if path.stem not in LOG_SCHEMAS:
                    raise IngestError(f"{path}: a Parquet input must be named <table>.parquet, table one of "
                                      f"{', '.join(TABLES)}")
                found.append(_Source(path, "parquet", path.stem))
            else:
                raise IngestError(f"{path}: expected a .jsonl or .parquet file, or a folder of them")
        else:
            raise IngestError(f"no such file or folder: {path}")
    return found


@dataclass
class Converted:
    """Log rows an adapter (`alignloop.data.adapters`) made from a file in another format, with the
    line of that file each row came from: quarantine records then point into the file the user gave,
    and are judged like any other row.

    `rejected`: (line, kind, reason, raw) of records that made no rows at all (not JSON, not a
    conversation); each counts as one conversation read and quarantined.
    """

    path: Path
    tables: dict[str, pa.Table]
    """log table -> rows, with its columns (nulls allowed: the checks catch them)"""
    lines: dict[str, list[int]]
    """log table -> the 1-based line (or row) of `path` each row came from"""
    rejected: list[tuple[int, str, str, str]]
    raw: Callable[[set[int]], dict[int, str]]
    """the raw text of lines of `path`, for quarantine records"""


def _read_converted(src: int, source: Converted, out: _Collector) -> None:
    for line, kind, reason, raw in source.rejected:
        out.read["conversations"] += 1
        out.bad("conversations", src, source.path, line, kind, reason, raw)
    for name, table in source.tables.items():
        if not table.num_rows:
            continue
        out.read[name] += table.num_rows
        lines = source.lines[name]
        raws: dict[int, str] = {}

        def raw_of(i: int, _row: dict[str, Any], lines: list[int] = lines, raws: dict[int, str] = raws) -> str:
            if not raws:  # one pass over the file, not one per flagged row
                raws.update(source.raw(set(lines)))
            return raws.get(lines[i], "")

        _add_checked(out, name, table, src, source.path, lines, raw_of)


def input_files(inputs: list[Path]) -> list[Path]:
    """The files `ingest` reads for `inputs` (folders expanded); raises `IngestError` as `ingest` would."""
    return [s.path for s in _sources([Path(p) for p in inputs])]


class _Collector:
    """Candidate rows (valid so far) per table as Arrow chunks, counts, and quarantine records."""

    def __init__(self, bounds: Plausible, latest: datetime) -> None:
        self.chunks: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self.read: Counter[str] = Counter()
        self.quarantine: list[dict[str, Any]] = []
        self.bounds = bounds
        self.latest = latest
        """timestamps after this are in the future"""

    def bad(self, table: str, src: int, source: Path, line: int, kind: str, reason: str, raw: str) -> None:
        self.quarantine.append({"table": table, "source": str(source), "line": line, "kind": kind,
                                "reason": reason, "raw": raw, _SRC: src})

    def add(self, name: str, table: pa.Table, src: int, lines: list[int] | pa.Array) -> None:
        table = table.append_column(_SRC, pa.array([src] * table.num_rows, pa.int32()))
        self.chunks[name].append(table.append_column(_LINE, pa.array(lines, pa.int64())))


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes, bytes]]:
    """(line number, raw bytes, stripped line) of every non-blank line of a JSONL file; a UTF-8
    byte-order mark before the first line is dropped (editors on Windows write one)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line:
                yield number, raw, line


def _read_jsonl(src: int, source: _Source, out: _Collector) -> None:
    name = source.table
    validate = (_ONE_TABLE[name] if name else _MIXED).validator.validate_json  # no per-call wrapper
    rows: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    lines: dict[str, list[bytes]] = {t: [] for t in TABLES}
    numbers: dict[str, list[int]] = {t: [] for t in TABLES}
    pending = 0

    def flush() -> None:
        nonlocal pending
        for t in TABLES:
            if rows[t]:
                out.read[t] += len(rows[t])
                table = _rows_to_table(t, rows[t])
                raw = lines[t]
                _add_checked(out, t, table, src, source.path, numbers[t],
                             lambda i, _row, raw=raw: raw[i].decode("utf-8", "replace"))
                rows[t], lines[t], numbers[t] = [], [], []
        pending = 0

    for number, raw, line in jsonl_lines(source.path):
        try:
            row = validate(line, strict=True)
        except ValidationError as e:
            kind, reason = _error_reason(e, tagged=name is None)
            table = name or _tag_of(e, line)
            if not raw.endswith(b"\n") and kind in (BAD_JSON, INVALID):
                kind, reason = TRUNCATED, f"last line cut off (no final newline): {reason}"
            out.read[table] += 1
            out.bad(table, src, source.path, number, kind, reason, raw.decode("utf-8", "replace").rstrip("\r\n"))
            continue
        t = name or row["table"]
        if len(_KEY.findall(line)) != len(row) and (twice := _duplicate_key(line)):
            out.read[t] += 1
            out.bad(t, src, source.path, number, DUPLICATE_KEY, f"key '{twice}' appears more than once "
                    "(JSON keeps the last one)", raw.decode("utf-8", "replace").rstrip("\r\n"))
            continue
        rows[t].append(row)
        lines[t].append(line)
        numbers[t].append(number)
        pending += 1
        if pending >= CHUNK_ROWS:
            flush()
    flush()


_KEY = re.compile(rb'"\s*:')
"""Ends a key, or sits inside a string: a line with no more of these than its row has keys repeats none."""


def _duplicate_key(line: bytes) -> str | None:
    """A key that `line`, a JSON object, names twice (the first such), or None."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(k for k, _ in items)
        found.extend(k for k, n in counts.items() if n > 1)
        return dict(items)

    try:
        json.loads(line, object_pairs_hook=pairs)
    except ValueError:
        return None
    return found[0] if found else None


def _rows_to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    # Column by column (faster than from_pylist); timestamps truncate to ms, the schema's precision.
    schema = LOG_SCHEMAS[name]
    if list(rows[0])[: len(schema)] == schema.names:
        # pydantic-core fills a TypedDict in field order, whatever the key order of the line, and
        # every field is there (the optional "table" tag comes last): transpose in one go.
        columns = list(zip(*(r.values() for r in rows)))[: len(schema)]
        if len(columns) == len(schema):
            return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)], schema=schema)
    columns = []
    for f in schema:
        info = ROW_MODELS[name].model_fields[f.name]
        values = ([r[f.name] for r in rows] if info.is_required()
                  else [r.get(f.name, info.get_default(call_default_factory=True)) for r in rows])
        columns.append(pa.array(values, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _add_checked(out: _Collector, name: str, table: pa.Table, src: int, path: Path,
                 numbers: list[int] | pa.Array, raw_of: typing.Callable[[int, dict[str, Any]], str]) -> None:
    """Add `table`'s rows to `out`, quarantining those the column-wise checks flag: first what the
    row model rejects, then what is implausible.

    `table` has `name`'s columns (nulls allowed); `numbers` are the rows' lines; `raw_of(i, row)`
    gives the raw text of the i-th row.
    """
    problems = column_problems(name, table)
    odd = implausible(name, table, out.bounds, out.latest)
    verdict = odd.with_columns(problem=problems).select(
        kind=pl.when(pl.col("problem").is_not_null()).then(pl.lit(INVALID)).otherwise("kind"),
        reason=pl.coalesce("problem", "reason"))
    bad = verdict["kind"].is_not_null().to_numpy()
    numbers = pa.array(numbers, pa.int64())
    if bad.any():
        mask = pa.array(bad, pa.bool_())
        flagged_at = bad.nonzero()[0]
        flagged = table.filter(mask).to_pylist()
        for i, row, line, (kind, reason) in zip(flagged_at, flagged, numbers.filter(mask).to_pylist(),
                                                verdict.filter(pl.col("kind").is_not_null()).iter_rows()):
            if kind == INVALID:
                reason = _row_model_reason(name, row) or reason
            out.bad(name, src, path, line, kind, reason, raw_of(int(i), row))
        keep = pa.array(~bad, pa.bool_())
        table, numbers = table.filter(keep), numbers.filter(keep)
    out.add(name, conform(name, table), src, numbers)  # the real schema: no nulls are left in required columns


def _tag_of(e: ValidationError, line: bytes) -> str:
    """The table a bad line of a mixed file belongs to, when it can be told."""
    first = e.errors(include_url=False)[0]
    if first["type"] not in ("json_invalid", "union_tag_not_found", "union_tag_invalid") and first["loc"]:
        tag = str(first["loc"][0])
        if tag in LOG_SCHEMAS:
            return tag
    m = _TABLE_TAG.search(line)
    if m and m.group(1).decode("utf-8", "replace") in LOG_SCHEMAS and first["type"] != "union_tag_invalid":
        return m.group(1).decode()
    return UNKNOWN


def _read_parquet(src: int, source: _Source, out: _Collector) -> None:
    name = source.table
    assert name is not None
    try:
        table = pq.read_table(source.path)
    except (OSError, pa.ArrowException) as e:
        raise IngestError(f"{source.path}: unreadable Parquet file: {e}") from None
    out.read[name] += table.num_rows
    numbers = pa.array(range(1, table.num_rows + 1), pa.int64())
    relaxed = {name: pa.schema([f.with_nullable(True) for f in LOG_SCHEMAS[name]])}
    try:
        table = conform(name, _truncate_timestamps(table), relaxed)
    except SchemaError:
        # Columns missing, extra, or not castable: judge the rows one by one.
        _parquet_rows_one_by_one(src, source, table, out)
        return
    _add_checked(out, name, table, src, source.path, numbers, lambda _i, row: _row_json(row))


def _truncate_timestamps(table: pa.Table) -> pa.Table:
    # Finer than ms (or naive, taken as UTC as in `alignloop.data.io`) -> the schema's ms UTC.
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type != TIMESTAMP:
            table = table.set_column(i, f.name, table.column(i).cast(TIMESTAMP, safe=False))
    return table


def _parquet_rows_one_by_one(src: int, source: _Source, table: pa.Table, out: _Collector) -> None:
    name = source.table
    assert name is not None
    model = ROW_MODELS[name]
    good: list[dict[str, Any]] = []
    lines: list[int] = []
    for number, row in enumerate(table.to_pylist(), start=1):
        try:
            fixed = {k: utc(v) if isinstance(v, datetime) else v for k, v in row.items()}  # naive = UTC, as in io
            item = model.model_validate(fixed)  # lax, like the casts of the column-wise path
        except ValidationError as e:
            _, reason = _error_reason(e, tagged=False)
            out.bad(name, src, source.path, number, INVALID, reason, _row_json(row))
            continue
        good.append(item.__dict__)
        lines.append(number)
    _add_checked(out, name, pa.Table.from_pylist(good, schema=LOG_SCHEMAS[name]), src, source.path, lines,
                 lambda _i, row: _row_json(row))


def _row_json(row: dict[str, Any]) -> str:
    return json.dumps(row, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v),
                      ensure_ascii=False)


# --- duplicates and references -----------------------------------------------------------------


def _frame(table: pa.Table) -> pl.DataFrame:
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    return df


def _with_hash(df: pl.DataFrame, name: str) -> pl.DataFrame:
    return df.with_columns(_h=df.select(LOG_SCHEMAS[name].names).hash_rows())


def _resolve(out: _Collector, existing: dict[str, pa.Table]) -> tuple[dict[str, pl.DataFrame], Counter[str],
                                                                       list[tuple[str, pl.DataFrame, str]]]:
    """Split the candidate rows into new rows (per table), duplicate counts, and late quarantines.

    Late quarantines are (table, rows with _src/_line and a `reason` column, kind).
    """
    new: dict[str, pl.DataFrame] = {}
    duplicates: Counter[str] = Counter()
    late: list[tuple[str, pl.DataFrame, str]] = []
    known: dict[str, pl.Series] = {}
    starts: dict[str, pl.DataFrame] = {}
    for name in TABLES:
        key = PRIMARY_KEYS[name]
        schema = LOG_SCHEMAS[name]
        chunks = out.chunks[name]
        df = _frame(pa.concat_tables(chunks)) if chunks else _frame(
            pa.schema(list(schema) + [pa.field(_SRC, pa.int32()), pa.field(_LINE, pa.int64())]).empty_table())
        df = _with_hash(df, name).with_row_index("_i")
        ex = existing.get(name)
        ex_df = _with_hash(_frame(ex), name).select(key, _eh="_h") if ex is not None else pl.DataFrame(
            {key: [], "_eh": []}, schema={key: pl.String, "_eh": pl.UInt64})

        df = df.join(ex_df, on=key, how="left", maintain_order="left")
        in_existing = pl.col("_eh").is_not_null()
        duplicates[name] += df.filter(in_existing & (pl.col("_eh") == pl.col("_h"))).height
        conflicts = df.filter(in_existing & (pl.col("_eh") != pl.col("_h")))
        if conflicts.height:
            late.append((name, conflicts.with_columns(
                reason=pl.format(f"{key} '{{}}' is already ingested with different content", pl.col(key))), CONFLICT))

        df = df.filter(~in_existing)
        first = pl.col(key).is_first_distinct()
        firsts = df.filter(first)
        rest = df.filter(~first).join(
            firsts.select(key, _fh="_h", _fsrc=_SRC, _fline=_LINE), on=key, how="left", maintain_order="left")

        # References of the first occurrences, against what is known (existing + accepted new).
        firsts, dangling = _check_references(name, firsts, known, existing)
        firsts, early = _check_order(name, firsts, starts)
        late += [(name, rows, kind) for rows, kind in ((dangling, DANGLING), (early, OUT_OF_ORDER)) if rows.height]
        accepted_keys = firsts.get_column(key)
        new[name] = firsts
        ex_keys = ex.column(key) if ex is not None else pa.array([], pa.string())
        known[name] = pl.concat([_frame(pa.table({key: ex_keys})).get_column(key), accepted_keys])
        if name in STARTS:
            begun = [firsts.select(key, STARTS[name])]
            starts[name] = pl.concat(begun + [_frame(ex).select(key, STARTS[name])] if ex is not None else begun)

        # Later occurrences: same content as the first -> the first's fate; else a conflict.
        same = pl.col("_h") == pl.col("_fh")
        twin_ok = pl.col(key).is_in(accepted_keys.implode())
        duplicates[name] += rest.filter(same & twin_ok).height
        late += _echoes(name, rest.filter(same & ~twin_ok), {DANGLING: dangling, OUT_OF_ORDER: early})
        clash = rest.filter(~same)
        if clash.height:
            late.append((name, clash.with_columns(reason=pl.format(
                f"{key} '{{}}' also names a different row (row of input {{}}, line {{}})",
                pl.col(key), pl.col("_fsrc") + 1, pl.col("_fline"))), CONFLICT))
    return new, duplicates, late


def _check_order(name: str, df: pl.DataFrame, starts: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows that happened no earlier than what they belong to began, rows with a `reason` that did).

    `starts`: per table of `STARTS`, the key and beginning of every known row (existing + accepted).
    A row's references are checked in `REFERENCES` order; its reason names the first broken one.
    """
    early: list[pl.DataFrame] = []
    for column, target in REFERENCES[name]:
        if target not in STARTS or name not in WHEN:
            continue
        begun = starts[target].rename({PRIMARY_KEYS[target]: column, STARTS[target]: "_begun"})
        df = df.join(begun, on=column, how="left", maintain_order="left")
        bad = (pl.col(WHEN[name]) < pl.col("_begun")).fill_null(False)
        flagged = df.filter(bad)
        if flagged.height:
            early.append(flagged.with_columns(reason=pl.format(
                f"{WHEN[name]} {{}} is before its {target.removesuffix('s')} began ({target}.{STARTS[target]} "
                f"{{}} of {column} '{{}}')", _iso(pl.col(WHEN[name])), _iso(pl.col("_begun")), pl.col(column)
            )).drop("_begun"))
        df = df.filter(~bad).drop("_begun")
    if early:
        return df, pl.concat(early, how="vertical_relaxed")
    return df, df.clear().with_columns(reason=pl.lit(None, pl.String))


def _echoes(name: str, echo: pl.DataFrame, rejected: dict[str, pl.DataFrame]) -> list[tuple[str, pl.DataFrame, str]]:
    """Late quarantines for exact repeats (`echo`) of rows rejected as `rejected` (kind -> rows with
    a `reason`): each repeat shares its first occurrence's fate and reason."""
    key = PRIMARY_KEYS[name]
    found = []
    for kind, rows in rejected.items():
        part = echo.join(rows.select(key, "reason").unique(key), on=key, how="inner", maintain_order="left")
        if part.height:
            found.append((name, part, kind))
    return found


def _check_references(name: str, df: pl.DataFrame, known: dict[str, pl.Series],
                      existing: dict[str, pa.Table]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows whose references all resolve, rows with a `reason` column that dangle)."""
    dangling: list[pl.DataFrame] = []
    for column, target in REFERENCES[name]:
        if target == name:
            continue
        ok = pl.col(column).is_null() | pl.col(column).is_in(known[target].implode())
        bad = df.filter(~ok)
        if bad.height:
            dangling.append(bad.with_columns(reason=_dangling_reason(column, target)))
            df = df.filter(ok)
    for column, target in REFERENCES[name]:
        if target != name:
            continue
        # A reference into the table itself (a turn's parent): drop rows whose parent is unknown
        # until none are left, so a quarantined turn takes its whole subtree with it.
        key = PRIMARY_KEYS[name]
        ex = existing.get(name)
        outside = _frame(pa.table({key: ex.column(key)})).get_column(key) if ex is not None else pl.Series(
            key, [], pl.String)
        while True:
            ok = (pl.col(column).is_null() | pl.col(column).is_in(outside.implode())
                  | pl.col(column).is_in(df.get_column(key).implode()))
            bad = df.filter(~ok)
            if not bad.height:
                break
            dangling.append(bad.with_columns(reason=_dangling_reason(column, target)))
            df = df.filter(ok)
    if dangling:
        return df, pl.concat(dangling, how="vertical_relaxed")
    return df, df.clear().with_columns(reason=pl.lit(None, pl.String))


def _dangling_reason(column: str, target: str) -> pl.Expr:
    return pl.format(f"{column} '{{}}' is not a known {target} row (not in this batch, not in existing, "
                     f"or quarantined)", pl.col(column))


# --- main --------------------------------------------------------------------------------------


def ingest(inputs: list[Path], out_dir: Path, *, existing: Path | None = None,
           quarantine: Path | None = None, report_path: Path | None = None,
           bounds: Plausible = Plausible(), converted: Sequence[Converted] = ()) -> IngestReport:
    """Validate `inputs` and write the good rows, with those of `existing`, as log tables into `out_dir`.

    `existing`: a log folder (e.g. an earlier `out_dir`, or `out_dir` itself) whose rows are kept,
    whose ids make re-ingested rows duplicates, and which references may point into.
    `quarantine` / `report_path`: where the bad rows and the counts go (default: in `out_dir`).
    `bounds`: what counts as plausible (the defaults suit real chat logs of today).
    `converted`: rows adapters made from other formats, checked like the rows of `inputs`.
    """
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    ingest_id = now.isoformat(timespec="microseconds")
    out_dir = Path(out_dir)
    quarantine = Path(quarantine) if quarantine is not None else out_dir / QUARANTINE
    report_path = Path(report_path) if report_path is not None else out_dir / REPORT
    sources: list[_Source | Converted] = [*_sources([Path(p) for p in inputs]), *converted]
    old = _read_existing(existing)

    out = _Collector(bounds, now + bounds.future)
    for i, source in enumerate(sources):
        if isinstance(source, Converted):
            _read_converted(i, source, out)
        else:
            (_read_jsonl if source.kind == "jsonl" else _read_parquet)(i, source, out)

    new, duplicates, late = _resolve(out, old)
    records = out.quarantine + _late_records(late, sources)
    records.sort(key=lambda r: (r[_SRC], r["line"]))

    tables = {}
    for name in TABLES:
        fresh = new[name].select(LOG_SCHEMAS[name].names).to_arrow()
        fresh = conform(name, fresh)
        tables[name] = pa.concat_tables([old[name], fresh]) if name in old else fresh
    outputs = write_logs(out_dir, tables)
    quarantine_total = _append_quarantine(quarantine, ingest_id, records)

    counts: dict[str, TableCounts] = {name: TableCounts() for name in TABLES}
    quarantined = Counter(r["table"] for r in records)
    for name in [*TABLES, *sorted(set(out.read) - set(TABLES))]:
        c = counts.setdefault(name, TableCounts())
        c.read = out.read[name]
        c.ingested = new[name].height if name in new else 0
        c.quarantined = quarantined[name]
        c.duplicates = duplicates[name]
    report = IngestReport(
        counts=counts,
        reasons=dict(Counter(r["kind"] for r in records).most_common()),
        inputs=[str(s.path) for s in sources],
        out_dir=str(out_dir),
        quarantine=str(quarantine),
        existing=str(existing) if existing is not None else None,
        seconds=time.perf_counter() - started,
        outputs=[str(p) for p in outputs],
        totals_after={name: t.num_rows for name, t in tables.items()},
        ingest_id=ingest_id,
        quarantine_total=quarantine_total,
    )
    if not report.balanced:  # a bug here, never the data's fault
        raise AssertionError(f"ingest lost count of rows: {report.to_dict()['counts']}")
    atomic_write_json(report_path, report.to_dict())
    return report


def _append_quarantine(path: Path, ingest_id: str, records: list[dict[str, Any]]) -> int:
    """Rewrite `path` atomically as its old records followed by `records`, each tagged with
    `ingest_id`; the number of records it then holds."""
    total = len(records)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        if path.is_file():
            with open(path, "rb") as old:
                for line in old:
                    if line.strip():
                        out.write(line if line.endswith(b"\n") else line + b"\n")
                        total += 1
        for r in records:
            record = {"ingest": ingest_id, **{k: v for k, v in r.items() if k != _SRC}}
            out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return total


def _read_existing(existing: Path | None) -> dict[str, pa.Table]:
    if existing is None:
        return {}
    existing = Path(existing)
    if not existing.is_dir():
        raise IngestError(f"existing log folder not found: {existing}")
    return read_tables(existing, LOG_SCHEMAS)


def _late_records(late: list[tuple[str, pl.DataFrame, str]],
                  sources: list[_Source | Converted]) -> list[dict[str, Any]]:
    """Quarantine records for rows that passed validation but failed later (raw text looked up again)."""
    records: list[dict[str, Any]] = []
    wanted: dict[int, set[int]] = {}
    for _, df, _ in late:
        for src, line in df.select(_SRC, _LINE).iter_rows():
            wanted.setdefault(src, set()).add(line)
    raw = {src: _raw_rows(sources[src], lines) for src, lines in wanted.items()}
    for name, df, kind in late:
        for src, line, reason in df.select(_SRC, _LINE, "reason").iter_rows():
            records.append({"table": name, "source": str(sources[src].path), "line": line, "kind": kind,
                            "reason": reason, "raw": raw[src].get(line, ""), _SRC: src})
    return records


def _raw_rows(source: _Source | Converted, lines: set[int]) -> dict[int, str]:
    if isinstance(source, Converted):
        return source.raw(lines)
    if source.kind == "jsonl":
        found = {}
        with open(source.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number in lines:
                    found[number] = raw.decode("utf-8", "replace").rstrip("\r\n")
        return found
    table = pq.read_table(source.path)
    indices = sorted(lines)
    rows = table.take(pa.array([i - 1 for i in indices])).to_pylist()
    return {i: _row_json(r) for i, r in zip(indices, rows)}


def iter_quarantine(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a quarantine file."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
