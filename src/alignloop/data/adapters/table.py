"""Chat exports as tables: a Parquet file, or a Hugging Face `datasets` dataset saved to disk, with
one conversation per row.

The source: a `messages` column in the OpenAI form (a list of `{role, content, ...}` structs), or
a `conversations` column in the ShareGPT form (`{from, value}`); any other column named as a field
of that format is read as that field, and the rest are ignored:

    | id   | user_id | created_at (timestamp or string) | model | messages                                  |
    |------|---------|----------------------------------|-------|-------------------------------------------|
    | c-17 | acct-9  | 2026-01-05 09:30:00+00:00        | v3    | [{role: user, content: "Ahoy!"}, ...]     |

How it maps onto the schema: each row is read exactly as one record of the JSON formats is.

| source column | schema field | when missing |
|---|---|---|
| `messages` (structs `role`, `content`, and optionally `timestamp`, `feedback` {`rating`}, `thumbs`, `alternatives`, `selected_index`) | `turns`, `events` as in `alignloop.data.adapters.openai` | one of `messages` / `conversations` is required |
| `conversations` (structs `from`, `value`, ...) | as in `alignloop.data.adapters.sharegpt` | |
| `id` / `conversation_id`, `user_id` / `user`, `created_at` / `timestamp`, `model`, (ShareGPT) `system` | as in those formats | as there ("table" is not the prefix: default ids are "openai-c-..." / "sharegpt-c-...") |

A null in a struct field (Arrow fills the fields a message did not have with nulls) is a missing
field. A timestamp column may be an Arrow timestamp (naive: UTC) or strings / numbers as in JSON.
`line` in quarantine records is the 1-based row. A saved `DatasetDict` is read split by split (each
split's folder is one input). Reading a saved dataset needs the `datasets` package, which alignloop
does not depend on: without it, such an input is one clear error, and Parquet files still work.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from alignloop.data.adapters import openai, sharegpt
from alignloop.data.adapters.records import Chat, ParsedFile, item_records, parse_file
from alignloop.data.ingest import IngestError

FORMAT = "table"
HF_MARKERS = ("dataset_info.json", "state.json")
HF_DICT = "dataset_dict.json"
PARSERS: dict[str, Callable[[Any], Chat]] = {"messages": openai.parse, "conversations": sharegpt.parse}


def is_saved_dataset(folder: Path) -> bool:
    """`folder` looks like `Dataset.save_to_disk` / `DatasetDict.save_to_disk` output."""
    return (folder / HF_DICT).is_file() or all((folder / m).is_file() for m in HF_MARKERS)


def record_format(columns: list[str], where: Path) -> str:
    """"openai" or "sharegpt", from a table's columns; raises `IngestError` when it cannot be told."""
    found = [c for c in PARSERS if c in columns]
    if len(found) == 1:
        return openai.FORMAT if found[0] == "messages" else sharegpt.FORMAT
    if found:
        raise IngestError(f"{where}: has both a `messages` and a `conversations` column; which one holds the "
                          "conversation is ambiguous (drop one)")
    raise IngestError(f"{where}: a chat table needs a `messages` (OpenAI) or `conversations` (ShareGPT) column; "
                      f"it has {', '.join(columns) or 'none'}")


def _load_datasets() -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise IngestError("reading a saved Hugging Face dataset needs the `datasets` package (pip install datasets); "
                          "or export it to Parquet (`dataset.to_parquet(...)`), which needs nothing extra")
    import datasets

    return datasets


def read_arrow(path: Path) -> pa.Table:
    """The rows of a Parquet file or of one saved dataset (a split)."""
    if path.is_file():
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise IngestError(f"{path}: unreadable Parquet file: {e}") from None
    datasets = _load_datasets()
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise IngestError(f"{path}: a DatasetDict; give its splits' folders one by one")
    return loaded.with_format("arrow")[:]


def inputs_of(path: Path) -> list[Path]:
    """The tables an input holds: a Parquet file, a saved dataset, or each split of a saved DatasetDict."""
    if path.is_dir() and (path / HF_DICT).is_file():
        return sorted(p for p in path.iterdir() if p.is_dir() and is_saved_dataset(p))
    return [path]


def parse_table(path: Path) -> ParsedFile:
    """One table's rows as chats (each row a record of the format its columns name)."""
    table = read_arrow(path)
    fmt = record_format(table.column_names, path)
    records, raw = item_records(table.to_pylist())
    return parse_file(path, fmt, records, PARSERS["messages" if fmt == openai.FORMAT else "conversations"], raw)
