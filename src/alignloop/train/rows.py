"""Training rows from a JSONL or Parquet file, each tagged with where it came from.

SFT conversations and DPO pairs are read the same way; only what a row must contain differs, so
the trainers validate rows themselves and this module only reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from alignloop.errors import AlignloopError


def read_rows(path: str | Path, what: str) -> list[tuple[str, Any]]:
    """(where, row) for every row; `where` is "file:line" or "file:row N" for error messages.
    Bad JSON or an empty file is an AlignloopError naming the file (and line)."""
    path = Path(path)
    if path.suffix == ".parquet":
        raw = [(f"{path}:row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    else:
        raw = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    raw.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise AlignloopError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not raw:
        raise AlignloopError(f"{path}: no {what} (the file is empty)")
    return raw
