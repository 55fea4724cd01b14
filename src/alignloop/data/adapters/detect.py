"""Which adapter reads an input: told by its content (`--format auto`) or named by the user.

| input | format |
|---|---|
| `<table>.jsonl` / `<table>.parquet` (a log table's name), a folder of them | `logs` (the schema's own) |
| other JSONL whose records have `"table"` | `logs` (a mixed file, each line names its table) |
| JSONL / JSON whose records have `"messages"` | `openai` |
| JSONL / JSON whose records have `"conversations"` | `sharegpt` |
| other Parquet, a folder saved by `datasets` | `table` |

Auto-detection looks at the first `PEEK` records that parse as JSON objects. It is an error, naming
the lines, when they disagree (a file mixing formats) or when one record has keys of two formats:
then `--format` says which. A JSONL file in which no record names a format is read as logs, as
ingest always has, so its lines are quarantined with the reasons ingest gives.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from alignloop.data.adapters import openai, sharegpt, table
from alignloop.data.adapters.records import (ParsedFile, converted, item_records, json_items, jsonl_raw,
                                             jsonl_records, parse_file)
from alignloop.data.ingest import Converted, IngestError
from alignloop.data.io import read_tables
from alignloop.data.schema import LOG_SCHEMAS

Format = Literal["auto", "logs", "openai", "sharegpt", "table"]
FORMATS: tuple[str, ...] = ("auto", "logs", "openai", "sharegpt", "table")
PEEK = 50
KEYS = {"table": "logs", "messages": openai.FORMAT, "conversations": sharegpt.FORMAT}
PARSERS = {openai.FORMAT: openai.parse, sharegpt.FORMAT: sharegpt.parse}


def _kind_of(item: Any, where: str) -> str | None:
    if not isinstance(item, dict):
        return None
    kinds = [kind for key, kind in KEYS.items() if key in item]
    if len(kinds) > 1:
        raise IngestError(f"{where}: has keys of more than one format ({', '.join(kinds)}); "
                          "say which with --format")
    return kinds[0] if kinds else None


def _vote(path: Path, kinds: list[tuple[int, str]], what: str) -> str | None:
    found = {kind for _, kind in kinds}
    if len(found) > 1:
        first = {}
        for line, kind in kinds:
            first.setdefault(kind, line)
        seen = ", ".join(f"{kind} ({what} {line})" for kind, line in first.items())
        raise IngestError(f"{path}: records of different formats: {seen}; split the file, or say which with --format")
    return found.pop() if found else None


def _peek_jsonl(path: Path) -> list[tuple[int, str]]:
    kinds: list[tuple[int, str]] = []
    seen = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip().removeprefix(codecs.BOM_UTF8) if number == 1 else raw.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            seen += 1
            kind = _kind_of(item, f"{path}, line {number}")
            if kind:
                kinds.append((number, kind))
            if seen >= PEEK:
                break
    return kinds


def detect(path: Path) -> str:
    """The format of input `path`: logs, openai, sharegpt or table. Raises `IngestError` when it
    cannot be told (a mix, a record with keys of two formats, a JSON file of neither format)."""
    if path.is_dir():
        logs = any((path / f"{name}.{ext}").is_file() for name in LOG_SCHEMAS for ext in ("parquet", "jsonl"))
        saved = table.is_saved_dataset(path)
        if logs and saved:
            raise IngestError(f"{path}: holds both log tables and a saved dataset; say which with --format")
        return table.FORMAT if saved else "logs"
    if path.stem in LOG_SCHEMAS and path.suffix in (".jsonl", ".parquet"):
        return "logs"
    if path.suffix == ".parquet":
        return table.FORMAT
    if path.suffix == ".jsonl":
        return _vote(path, _peek_jsonl(path), "line") or "logs"
    if path.suffix == ".json":
        items = json_items(path)
        kinds = [(i, k) for i, item in enumerate(items[:PEEK], start=1) if (k := _kind_of(item, f"{path}, item {i}"))]
        kind = _vote(path, kinds, "item")
        if kind is None or kind == "logs":
            raise IngestError(f"{path}: not an OpenAI (`messages`) or ShareGPT (`conversations`) export; log rows "
                              "come as JSONL, one per line")
        return kind
    return "logs"  # ingest names what it expects


def split_inputs(inputs: Iterable[Path], fmt: str = "auto") -> tuple[list[Path], list[tuple[Path, str]]]:
    """(inputs in the schema's own format, [(export, its format)]) of `inputs` read as `fmt`."""
    if fmt not in FORMATS:
        raise IngestError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    native: list[Path] = []
    exports: list[tuple[Path, str]] = []
    for path in map(Path, inputs):
        if not path.exists():
            raise IngestError(f"no such file or folder: {path}")
        kind = detect(path) if fmt == "auto" else fmt
        if kind == "logs":
            native.append(path)
        elif kind == table.FORMAT:
            if path.is_file() and path.suffix != ".parquet" or path.is_dir() and not table.is_saved_dataset(path):
                raise IngestError(f"{path}: --format table reads Parquet files and folders saved by `datasets`")
            exports += [(p, kind) for p in table.inputs_of(path)]
        else:
            if not path.is_file() or path.suffix not in (".jsonl", ".json"):
                raise IngestError(f"{path}: --format {kind} reads .jsonl or .json files")
            exports.append((path, kind))
    return native, exports


def parse_export(path: Path, fmt: str) -> ParsedFile:
    """One export file read by the adapter of `fmt` (openai, sharegpt or table)."""
    if fmt == table.FORMAT:
        return table.parse_table(path)
    if path.suffix == ".json":
        records, raw = item_records(json_items(path))
        return parse_file(path, fmt, records, PARSERS[fmt], raw)
    return parse_file(path, fmt, jsonl_records(path), PARSERS[fmt], jsonl_raw(path))


def convert(exports: Iterable[tuple[Path, str]], known_users: Iterable[str] = ()) -> list[Converted]:
    """Every export's log rows, for `ingest(..., converted=...)` (users gathered across them)."""
    return converted([parse_export(path, fmt) for path, fmt in exports], known_users)


def known_users(folder: Path | None) -> set[str]:
    """The user ids of log folder `folder` (none for None), so a later export adds no second row."""
    if folder is None:
        return set()
    found = read_tables(folder, {"users": LOG_SCHEMAS["users"]})
    return set(found["users"].column("user_id").to_pylist()) if "users" in found else set()


def export_files(path: Path) -> list[Path]:
    """The files an export is read from (a saved dataset's folder: all of them), for the manifest."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]
