"""User partitions: the unit the filters and builders work in, in memory or streamed from disk.

Every row of one user lands in the same partition (a stable hash of the user id; turns follow
their conversation), so per-user work (bot detection, caps, contexts) never crosses partitions
and a partition is exactly what a Ray Data block grouped by user would hold.

On disk, `repartition` streams a log folder into `part-00000/`, `part-00001/`, ... batch by batch
(memory: one batch plus the conversation -> user map), and `PartitionedWriter` writes tables
whose partitions are runs of whole row groups, indexed in `partitions.json`, so one file per table
still reads as a whole (`read_tables`) or partition by partition (`read_partition`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from alignloop.data.io import TableWriter, read_table
from alignloop.data.schema import LOG_SCHEMAS, conform
from alignloop.data.stablehash import hash_strings
from alignloop.runs import atomic_write_json

INDEX = "partitions.json"
SALT = "partition"

Frames = dict[str, pl.DataFrame]


def user_partition(user_ids: pl.Series, partitions: int) -> pl.DataFrame:
    """user_id -> part (stable hash of the id modulo `partitions`), one row per distinct user."""
    users = pl.DataFrame({"user_id": user_ids}).unique(maintain_order=True)
    if partitions == 1:
        return users.with_columns(part=pl.lit(0, pl.UInt32))
    h = hash_strings(users["user_id"], SALT)
    return users.with_columns(part=pl.Series((h % np.uint64(partitions)).astype(np.uint32)))


def split_frames(frames: Frames, partitions: int) -> list[Frames]:
    """The frames cut into user partitions, in memory."""
    if partitions == 1:
        return [frames]
    part = user_partition(pl.concat([frames["users"]["user_id"], frames["conversations"]["user_id"]]), partitions)
    convs = frames["conversations"].select("conversation_id", "user_id").join(part, on="user_id", how="left")
    out = []
    for k in range(partitions):
        users = part.filter(pl.col("part") == k).select("user_id")
        cs = convs.filter(pl.col("part") == k).select("conversation_id")
        piece: Frames = {}
        for name, df in frames.items():
            key, keys = ("user_id", users) if "user_id" in df.columns else ("conversation_id", cs)
            piece[name] = df.join(keys, on=key, how="semi")
        out.append(piece)
    return out


def _files(folder: Path, names: Iterable[str]) -> dict[str, Path]:
    found = {}
    for name in names:
        for suffix in (".parquet", ".jsonl"):
            if (folder / f"{name}{suffix}").is_file():
                found[name] = folder / f"{name}{suffix}"
                break
    return found


def _batches(path: Path, name: str, schemas: Mapping[str, pa.Schema], batch_rows: int) -> Iterable[pa.Table]:
    if path.suffix == ".parquet":
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield conform(name, pa.Table.from_batches([batch]), schemas)
    else:  # JSONL is read whole (pyarrow has no streaming JSON reader that keeps the schema checks)
        table = read_table(path, name, schemas)
        for start in range(0, table.num_rows, batch_rows):
            yield table.slice(start, batch_rows)


def count_rows(folder: str | Path, name: str = "events") -> int:
    """Rows of one table in a log folder (Parquet: from the footer, without reading data)."""
    path = _files(Path(folder), [name]).get(name)
    if path is None:
        return 0
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def repartition(src: str | Path, dst: str | Path, partitions: int, schemas: Mapping[str, pa.Schema] = LOG_SCHEMAS,
                batch_rows: int = 1 << 20) -> dict[str, Any]:
    """Stream the tables of folder `src` into scratch folders `dst/part-00000/`, `part-00001/`, ...
    by user (read them with `read_scratch`); returns {"partitions", "rows" per table,
    "observed_until": the last event or session end, as derived labels need it}."""
    src, dst = Path(src), Path(dst)
    files = _files(src, schemas)
    convs = pl.concat([pl.from_arrow(t.select(["conversation_id", "user_id"]))
                       for t in _batches(files["conversations"], "conversations", schemas, batch_rows)])
    users = pl.concat([pl.from_arrow(t.select(["user_id"]))
                       for t in _batches(files["users"], "users", schemas, batch_rows)])
    part = user_partition(pl.concat([users["user_id"], convs["user_id"]]), partitions)
    conv_part = convs.join(part, on="user_id", how="left").select("conversation_id", "part")
    counts = dict.fromkeys(files, 0)
    until: datetime | None = None
    writers = [ScratchWriter(partition_folder(dst, k), schemas, files) for k in range(partitions)]
    try:
        for name, path in files.items():
            for table in _batches(path, name, schemas, batch_rows):
                df = pl.from_arrow(table)
                counts[name] += df.height
                column = {"events": "timestamp", "sessions": "ended_at"}.get(name)
                if column is not None:
                    last = df[column].max()
                    if last is not None and (until is None or last > until):
                        until = last
                if "user_id" in df.columns:
                    df = df.join(part, on="user_id", how="left", maintain_order="left")
                else:
                    df = df.join(conv_part, on="conversation_id", how="left", maintain_order="left")
                for (k,), piece in df.partition_by("part", as_dict=True, maintain_order=True).items():
                    if k is None:
                        raise ValueError(f"{path}: rows of unknown users or conversations")
                    writers[k].write({name: piece.drop("part").to_arrow()})
    finally:
        for w in writers:
            w.close()
    return {"partitions": partitions, "rows": counts, "observed_until": until}


def partition_folder(dst: str | Path, k: int, version: int | None = None) -> Path:
    return Path(dst) / (f"part-{k:05d}" if version is None else f"part-{k:05d}.{version}")


class ScratchWriter:
    """Scratch tables (Arrow IPC files, uncompressed: written and read back at disk speed, no
    Parquet encoding), appended chunk by chunk: `<folder>/<table>.arrow`."""

    def __init__(self, folder: str | Path, schemas: Mapping[str, pa.Schema], names: Iterable[str]):
        self.folder = Path(folder)
        self.schemas = dict(schemas)
        self.names = list(names)
        self.sinks: dict[str, Any] = {}

    def write(self, tables: Mapping[str, pa.Table]) -> None:
        for name, table in tables.items():
            if name not in self.sinks:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.sinks[name] = pa.ipc.new_file(self.folder / f"{name}.arrow", self.schemas[name])
            self.sinks[name].write_table(conform(name, table, self.schemas))

    def close(self) -> None:
        for name in self.names:
            if name not in self.sinks:
                self.write({name: self.schemas[name].empty_table()})
        for sink in self.sinks.values():
            sink.close()


def write_scratch(folder: str | Path, tables: Mapping[str, pa.Table], schemas: Mapping[str, pa.Schema]) -> None:
    w = ScratchWriter(folder, schemas, tables)
    w.write(tables)
    w.close()


def read_scratch(folder: str | Path, schemas: Mapping[str, pa.Schema]) -> dict[str, pa.Table]:
    """The scratch tables in `folder`."""
    out = {}
    for name in schemas:
        path = Path(folder) / f"{name}.arrow"
        if path.is_file():
            # Read, not memory-mapped: mapped pages would count as resident memory while in use.
            with pa.OSFile(str(path)) as source:
                out[name] = pa.ipc.open_file(source).read_all()
    return out


class PartitionedWriter:
    """Tables written partition by partition into one file each; `partitions.json` maps each
    partition to its row range (whole row groups: every partition is written as its own)."""

    def __init__(self, folder: str | Path, schemas: Mapping[str, pa.Schema], names: Iterable[str]):
        self.folder = Path(folder)
        self.writer = TableWriter(self.folder, schemas, only=list(names))
        self.ranges: dict[str, list[list[int]]] = {name: [] for name in self.writer.names}

    def __enter__(self) -> Self:
        self.writer.__enter__()
        return self

    def write(self, tables: Mapping[str, pa.Table]) -> None:
        """One partition: every table gets a range, empty when it has no rows."""
        for name in self.writer.names:
            start = self.writer.rows[name]
            if name in tables:
                self.writer.write({name: tables[name]})
            self.ranges[name].append([start, self.writer.rows[name]])

    def close(self) -> list[Path]:
        files = self.writer.close()
        index = self.folder / INDEX
        atomic_write_json(index, {"partitions": len(next(iter(self.ranges.values()), [])), "rows": self.ranges})
        return [*files, index]

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.writer.__exit__(kind, exc, tb)


def partitions_in(folder: str | Path) -> int | None:
    """How many partitions a folder written by `PartitionedWriter` holds (None: not partitioned)."""
    index = Path(folder) / INDEX
    if not index.is_file():
        return None
    return int(json.loads(index.read_text(encoding="utf-8"))["partitions"])


def read_partition(folder: str | Path, k: int, schemas: Mapping[str, pa.Schema]) -> dict[str, pa.Table]:
    """Partition `k` of every table in a `PartitionedWriter` folder (reads only its row groups)."""
    folder = Path(folder)
    ranges = json.loads((folder / INDEX).read_text(encoding="utf-8"))["rows"]
    out = {}
    for name, path in _files(folder, schemas).items():
        start, stop = ranges[name][k]
        if path.suffix != ".parquet":
            out[name] = read_table(path, name, schemas).slice(start, stop - start)
            continue
        pf = pq.ParquetFile(path)
        offsets = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = [i for i in range(pf.num_row_groups) if start <= offsets[i] < stop]
        table = pf.read_row_groups(groups) if groups else schemas[name].empty_table()
        if table.num_rows != stop - start:
            raise ValueError(f"{path}: partition {k} is not whole row groups ({table.num_rows} != {stop - start})")
        out[name] = conform(name, table, schemas)
    return out
