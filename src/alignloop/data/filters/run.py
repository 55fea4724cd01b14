"""Running the filters over user partitions: the plan of passes, one partition's share of a pass,
the global step between passes, and the funnel report at the end.

The same functions drive the in-memory and on-disk Polars paths here and the Ray Data path
(`alignloop.data.ray_engine`): only where a partition lives and who runs `run_pass` differ.

A local filter (per-user or per-turn decisions) runs start to end inside each partition. A global
one (repeats, diversity) needs every partition's signature first: a pass computes the signatures
(and saves each partition), the filter resolves once (`Tallies.resolve`), and the next pass
applies it before going on. Consecutive global filters about conversations share a pass: a
conversation's signature does not depend on the others, so each later one resolves without the
conversations the earlier ones dropped.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import polars as pl
import pyarrow as pa

from alignloop.data.filters.base import (
    FILTERED_SCHEMAS,
    TABLE_ORDER,
    Filter,
    Frames,
    no_decisions,
    prepare,
    rows,
    to_arrow,
)
from alignloop.data.filters.config import FilterConfig, make_filters
from alignloop.data.filters.report import FunnelReport, dropped_rows, filter_report
from alignloop.data.parts import (
    PartitionedWriter,
    count_rows,
    partition_folder,
    read_scratch,
    repartition,
    split_frames,
    write_scratch,
)
from alignloop.data.schema import LOG_SCHEMAS


class Pass(NamedTuple):
    """One pass over the partitions: global decisions of the previous pass are applied first
    (`Tallies.pending`), then `local` filters run, then the signatures of `batch` are computed."""

    local: list[Filter]
    batch: list[Filter]


def plan_passes(filters: Sequence[Filter]) -> list[Pass]:
    """The passes for `filters` in order; the last pass has no global filters."""
    passes = []
    i = 0
    while True:
        g = next((j for j in range(i, len(filters)) if filters[j].scope == "global"), len(filters))
        h = g
        while h < len(filters) and filters[h].scope == "global" and (
                h == g or filters[h].unit == "conversations" and filters[h - 1].unit == "conversations"):
            h += 1
        passes.append(Pass(list(filters[i:g]), list(filters[g:h])))
        if g == h:
            return passes
        i = h


def own(df: pl.DataFrame) -> pl.DataFrame:
    """A compact copy owning its memory. Polars strings are views into their source's buffers, so
    a small frame kept from a partition (decisions, signatures) would otherwise pin the whole
    partition's id columns in memory until the end of the run."""
    return pl.from_arrow(df.to_arrow(compat_level=pl.CompatLevel.oldest()))


def check_decisions(flt: Filter, items: pl.DataFrame, decisions: pl.DataFrame) -> None:
    unknown = decisions.join(items, on="id", how="anti").height
    if unknown:
        raise RuntimeError(f"filter {flt.name}: {unknown} decision(s) about items it was not given")


def _add(which: dict[str, int], counts: Mapping[str, int]) -> None:
    for k, v in counts.items():
        which[k] = which.get(k, 0) + v


@dataclass
class PassOutput:
    """What one partition's share of a pass reports (small frames only: picklable for Ray)."""

    input_rows: dict[str, int] | None = None  # the partition as loaded, on the first pass
    before: dict[str, dict[str, int]] = field(default_factory=dict)  # per filter: rows before it
    after: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    n_items: dict[str, int] = field(default_factory=dict)  # local filters
    decisions: dict[str, pl.DataFrame] = field(default_factory=dict)  # local filters
    items: dict[str, pl.DataFrame] = field(default_factory=dict)  # local (if kept) and global filters
    signatures: dict[str, pl.DataFrame] = field(default_factory=dict)  # global filters
    out_of_scope: dict[str, dict[str, int]] = field(default_factory=dict)  # per filter, per rule


def run_pass(frames: Frames, step: Pass, pending: Sequence[tuple[Filter, pl.DataFrame]], keep_inputs: bool,
             first: bool) -> tuple[Frames, PassOutput]:
    """One partition's share of a pass: its frames afterwards, and what it reports."""
    out = PassOutput(input_rows=rows(frames) if first else None)
    for n, (flt, decisions) in enumerate(pending):
        start = time.perf_counter()
        if n:  # the first one's "before" was counted when its signature was taken
            out.before[flt.name] = rows(frames)
        frames = flt.apply(frames, decisions)
        out.after[flt.name] = rows(frames)
        out.seconds[flt.name] = time.perf_counter() - start
    for flt in step.local:
        start = time.perf_counter()
        out.before[flt.name] = rows(frames)
        items = flt.items(frames)
        out.out_of_scope[flt.name] = flt.out_of_scope(frames)
        decisions = flt.resolve(flt.signature(frames))
        check_decisions(flt, items, decisions)
        frames = flt.apply(frames, decisions)
        out.after[flt.name] = rows(frames)
        out.n_items[flt.name] = items.height
        out.decisions[flt.name] = own(decisions)
        if keep_inputs:
            out.items[flt.name] = own(items)
        out.seconds[flt.name] = time.perf_counter() - start
    for n, flt in enumerate(step.batch):
        start = time.perf_counter()
        if n == 0:
            out.before[flt.name] = rows(frames)
        out.items[flt.name] = own(flt.items(frames))  # trimmed in `resolve`, once earlier decisions are known
        out.out_of_scope[flt.name] = flt.out_of_scope(frames)
        out.signatures[flt.name] = own(flt.signature(frames))
        out.seconds[flt.name] = time.perf_counter() - start
    return frames, out


@dataclass
class _Tally:
    """One filter's numbers, summed over partitions."""

    n_items: int = 0
    items: list[pl.DataFrame] = field(default_factory=list)  # kept only for evaluation
    decisions: list[pl.DataFrame] = field(default_factory=list)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    out_of_scope: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Tallies:
    """The running totals of a filter run: `add` each partition's `PassOutput` (in partition order),
    `resolve` the pass's global filters once all are in, `report` at the end."""

    def __init__(self, filters: Sequence[Filter], keep_inputs: bool):
        self.filters = list(filters)
        self.keep_inputs = keep_inputs
        self.input_rows: dict[str, int] = {}
        self.tally = {f.name: _Tally() for f in filters}
        self._items: dict[str, list[pl.DataFrame]] = {}
        self._signatures: dict[str, list[pl.DataFrame]] = {}

    def add(self, step: Pass, out: PassOutput) -> None:
        if out.input_rows is not None:
            _add(self.input_rows, out.input_rows)
        for name, counts in out.before.items():
            _add(self.tally[name].before, counts)
        for name, counts in out.after.items():
            _add(self.tally[name].after, counts)
        for name, s in out.seconds.items():
            self.tally[name].seconds += s
        for name, counts in out.out_of_scope.items():
            _add(self.tally[name].out_of_scope, counts)
        for flt in step.local:
            t = self.tally[flt.name]
            t.n_items += out.n_items[flt.name]
            t.decisions.append(out.decisions[flt.name])
            if self.keep_inputs:
                t.items.append(out.items[flt.name])
        for flt in step.batch:
            self._items.setdefault(flt.name, []).append(out.items[flt.name])
            self._signatures.setdefault(flt.name, []).append(out.signatures[flt.name])

    def resolve(self, step: Pass) -> list[tuple[Filter, pl.DataFrame]]:
        """The global step: each filter of `step.batch` decides once, on every partition's signature
        (without the conversations the filters before it in the batch dropped). Returns the
        decisions the next pass applies."""
        pending = []
        gone = pl.DataFrame(schema={"conversation_id": pl.String})
        for flt in step.batch:
            t = self.tally[flt.name]
            start = time.perf_counter()
            items = pl.concat(self._items.pop(flt.name, [])).join(gone, left_on="id", right_on="conversation_id",
                                                                 how="anti")
            t.n_items += items.height
            if self.keep_inputs:
                t.items.append(items)
            signature = pl.concat(self._signatures.pop(flt.name, []))
            if "conversation_id" in signature.columns and gone.height:
                signature = signature.join(gone, on="conversation_id", how="anti")
            decisions = flt.resolve(signature)
            check_decisions(flt, items, decisions)
            t.decisions.append(decisions)
            t.seconds += time.perf_counter() - start
            pending.append((flt, decisions))
            if flt.unit == "conversations" and not (flt.name == "user_cap" and flt.config.mode == "weight"):
                gone = pl.concat([gone, decisions.select(conversation_id="id")])
        return pending

    def report(self) -> FunnelReport:
        """The funnel report: every filter's numbers and every dropped item."""
        report = FunnelReport(input_rows=self.input_rows, output_rows={})
        dropped = []
        previous = self.input_rows
        for flt in self.filters:
            t = self.tally[flt.name]
            decisions = pl.concat(t.decisions) if t.decisions else no_decisions()
            report.filters.append(filter_report(flt, t.n_items, decisions, t.before, t.after, t.seconds,
                                                t.out_of_scope))
            dropped.append(dropped_rows(flt, decisions))
            if self.keep_inputs:
                report.inputs[flt.name] = (pl.concat(t.items) if t.items
                                           else pl.DataFrame(schema={"id": pl.String, "user_id": pl.String}))
            previous = t.after
        report.output_rows = dict(previous)
        if dropped:
            report.dropped = pl.concat(dropped)
        return report


# --- where partitions live ---------------------------------------------------------------------


def split_partitions(frames: Frames, partitions: int) -> list[Frames]:
    """The frames cut into user partitions (every row of one user lands in the same partition)."""
    return split_frames(frames, partitions)


def concat_partitions(parts: Sequence[Frames]) -> Frames:
    if len(parts) == 1:
        return parts[0]
    return {name: pl.concat([p[name] for p in parts]) for name in parts[0]}


class MemoryStore:
    """Partitions kept in memory."""

    def __init__(self, parts: list[Frames]):
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts)

    def load(self, k: int) -> Frames:
        return self.parts[k]

    def save(self, k: int, frames: Frames) -> None:
        self.parts[k] = frames


def load_raw_partition(raw: Path, k: int, observed_until: datetime | None) -> Frames:
    """Partition k of a `parts.repartition` folder, prepared (labels derived against the global log end)."""
    return prepare(read_scratch(partition_folder(raw, k), LOG_SCHEMAS), observed_until=observed_until)


def save_state(folder: Path, frames: Frames) -> None:
    write_scratch(folder, to_arrow(frames), FILTERED_SCHEMAS)


def load_state(folder: Path) -> Frames:
    return {n: pl.from_arrow(t) for n, t in read_scratch(folder, FILTERED_SCHEMAS).items()}


class DiskStore:
    """Partitions on disk: raw logs first, then the state after each pass; one in memory at a time."""

    def __init__(self, raw: Path, work: Path, partitions: int, observed_until: datetime | None):
        self.raw, self.work, self.n, self.until = raw, work, partitions, observed_until
        self.saved: dict[int, int] = {}  # partition -> version of its latest saved state

    def __len__(self) -> int:
        return self.n

    def load(self, k: int) -> Frames:
        if k in self.saved:
            return load_state(partition_folder(self.work, k, self.saved[k]))
        return load_raw_partition(self.raw, k, self.until)

    def save(self, k: int, frames: Frames) -> None:
        version = self.saved.get(k, -1) + 1  # a new folder per pass: the old one is read until then
        save_state(partition_folder(self.work, k, version), frames)
        if version:
            shutil.rmtree(partition_folder(self.work, k, version - 1), ignore_errors=True)
        self.saved[k] = version


def drive(store: MemoryStore | DiskStore, filters: list[Filter], keep_inputs: bool, emit: Any = None,
          workers: int = 1) -> FunnelReport:
    """Run `filters` over the partitions of `store`, pass by pass. With `emit`, each partition of
    the last pass goes to `emit(k, frames)` instead of back into the store.

    `workers` > 1 (partitions in memory only): that many partitions go through a pass at once, on
    threads. Polars and numpy let go of the GIL, and one partition's chain of mostly small,
    single-threaded operations keeps about 1.5 of 2 cores busy on its own; two side by side keep
    both busy (1M events, 2 cores: 4.5-5.0 -> 3.4-4.0 s). Outputs are added in partition order, so the
    report does not depend on which thread finished first."""
    tallies = Tallies(filters, keep_inputs)
    pending: list[tuple[Filter, pl.DataFrame]] = []
    passes = plan_passes(filters)
    parallel = workers > 1 and isinstance(store, MemoryStore) and len(store) > 1 and emit is None
    with ThreadPoolExecutor(max_workers=workers if parallel else 1, thread_name_prefix="alignloop-filter") as pool:
        for number, step in enumerate(passes):
            last = number == len(passes) - 1

            def one(k: int, step: Pass = step, number: int = number, pending: list = pending
                    ) -> tuple[Frames, PassOutput]:
                return run_pass(store.load(k), step, pending, keep_inputs, first=number == 0)

            outputs = pool.map(one, range(len(store))) if parallel else (one(k) for k in range(len(store)))
            for k, (frames, out) in enumerate(outputs):
                tallies.add(step, out)
                if last and emit is not None:
                    emit(k, frames)
                else:
                    store.save(k, frames)
                del frames
            pending = tallies.resolve(step)
    return tallies.report()


def run_filters(tables: Mapping[str, pa.Table | pl.DataFrame], config: FilterConfig | None = None,
                keep_inputs: bool = True, workers: int | None = None) -> tuple[Frames, FunnelReport]:
    """Run the enabled filters in order; returns the filtered frames and the funnel report.

    `tables`: the five log tables (labels optional: derived from them when missing). With
    `config.partitions > 1` the work runs one user partition at a time, as a Ray Data job would
    run it per block; the result is the same. `config.partitions = 0` (auto) cuts logs of
    `PARALLEL_EVENTS` events or more into `PARALLEL_PARTITIONS` partitions, run side by side on
    `workers` threads (`drive`; default Polars' thread count, at most one per partition).
    """
    config = config or FilterConfig()
    t0 = time.perf_counter()
    frames = prepare(tables)
    partitions = config.partitions or memory_partitions(frames["events"].height)
    store = MemoryStore(split_partitions(frames, partitions))
    del frames
    report = drive(store, make_filters(config), keep_inputs, workers=min(workers or pl.thread_pool_size(), partitions))
    out = concat_partitions(store.parts)
    report.output_rows = rows(out)
    report.seconds = time.perf_counter() - t0
    return out, report


PARALLEL_EVENTS = 200_000
"""In memory, fewer events than this stay one partition: cutting them costs more than running
two side by side saves."""
PARALLEL_PARTITIONS = 2
"""Partitions of a big in-memory run: fixed, not the machine's thread count, because the filtered
tables come out partition after partition, and their row order should not depend on the machine."""


def memory_partitions(events: int) -> int:
    """Partitions of an in-memory filter run with `config.partitions = 0`."""
    return PARALLEL_PARTITIONS if events >= PARALLEL_EVENTS else 1


def auto_partitions(events: int, events_per_partition: int) -> int:
    """One partition (all in memory, fastest) up to 1.5x the partition size, else about that size each."""
    return 1 if events <= 1.5 * events_per_partition else -(-events // events_per_partition)


def run_filters_on_disk(source: str | Path, out_dir: str | Path, config: FilterConfig | None = None,
                        partitions: int | None = None, work_dir: str | Path | None = None,
                        keep_inputs: bool = True) -> tuple[list[Path], FunnelReport]:
    """`run_filters` streamed: the log folder `source` is cut into user partitions on disk and each
    pass holds one partition in memory, so memory follows the partition size, not the log size.

    Writes the filtered tables into `out_dir` (one file per table, partitions as row groups, indexed
    by `partitions.json` for the builders). Returns the files written and the report.
    """
    config = config or FilterConfig()
    t0 = time.perf_counter()
    n = partitions or config.partitions or auto_partitions(count_rows(source), config.events_per_partition)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="alignloop-filter-", dir=work_dir) as tmp:
        info = repartition(source, Path(tmp) / "raw", n)
        store = DiskStore(Path(tmp) / "raw", Path(tmp) / "state", n, info["observed_until"])
        with PartitionedWriter(out_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
            report = drive(store, make_filters(config), keep_inputs,
                           emit=lambda k, frames: writer.write(to_arrow(frames)))
        files = writer.close()
    report.seconds = time.perf_counter() - t0
    return files, report
