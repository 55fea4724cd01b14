"""The filter and build stages on Ray Data: the same per-partition code as the Polars path, mapped
over user partitions by a local (or any) Ray cluster, with identical outputs.

    run_pipeline(source, out_dir, filter_config, build_config, engine="polars" | "ray")
        out_dir/tables/     the filtered logs (one file per table, partitions as row groups,
                            `partitions.json`), as `alignloop logs filter` writes them
        out_dir/datasets/   sft, dpo, rm/<signal>/{train,eval}, distill, as `alignloop logs build`

How the Ray path runs (`run_filters_ray`, `build_datasets_ray`):

1. The log folder is cut into user partitions on disk (`parts.repartition`, as the streamed
   Polars path does). A Ray Dataset holds one row per partition; each stage is a `map` over it
   whose task loads its partition from the shared work folder, runs the project's stage functions
   on it, and writes what it produced back there (only small counts travel through Ray).
2. Filters: the passes are planned exactly as `filters._drive` plans them. A pass applies the
   global decisions of the previous pass, runs the local filters (`signature -> resolve ->
   apply`, all inside the partition) and computes the signatures of the next global filters
   (repeats, diversity). Between passes the driver concatenates the signatures in partition
   order and resolves them once, with the filters' own `resolve` -- the same global step as the
   Polars path, so the same conversations are dropped.
3. The last pass writes each filtered partition; the driver appends them, in partition order,
   to the output tables (`parts.PartitionedWriter`).
4. Build: one task per filtered partition runs `builders.iter_partition` (cut by
   `events_per_partition` like `build_datasets` cuts it); the driver appends every dataset in
   partition order with the builders' own writers, and deduplicates and caps distillation
   prompts across partitions from the spill file as `build_datasets` does.

Identical outputs: the Ray path writes the same rows in the same order as the Polars path given
the same partition count (the partition count is also the Ray parallelism; the Polars filters
give the same rows for any partition count, in partition-major order).

Ray is started locally when nothing is running (`ray_session`: `num_cpus`, no dashboard), and
stopped again afterwards; an already initialised Ray (a cluster) is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa

from alignloop.data.builders import BuildConfig, BuildReport, build_datasets
from alignloop.data.filters import (
    FILTERED_SCHEMAS,
    TABLE_ORDER,
    Filter,
    FilterConfig,
    FunnelReport,
    make_filters,
    prepare,
    rows,
    run_filters,
    run_filters_on_disk,
    to_arrow,
)
from alignloop.data.parts import (
    PartitionedWriter,
    count_rows,
    partition_folder,
    partitions_in,
)

Engine = Literal["polars", "ray"]
ENGINES: tuple[str, ...] = ("polars", "ray")


def _auto_partitions(events: int, events_per_partition: int) -> int:
    """The partition count the Polars path picks for this many events."""
    try:
        from alignloop.data.filters import auto_partitions
    except ImportError:  # older filters: about `events_per_partition` events each
        return max(1, -(-events // events_per_partition))
    return auto_partitions(events, events_per_partition)


# --- Ray ---------------------------------------------------------------------------------------


def ray_available() -> bool:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = 2, object_store_mb: int = 512) -> Iterator[None]:
    """A local Ray for the duration (started here, shut down after; `RAY_ADDRESS` set: that cluster),
    or the Ray already initialised in this process, as it is."""
    try:
        import ray
        import ray.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the Ray engine needs Ray Data: pip install "alignloop[ray]"') from e
    import logging

    quiet = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    for name in quiet:  # Ray Data logs every execution at INFO level
        logging.getLogger(name).setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
        import os

        if os.environ.get("RAY_ADDRESS"):  # a cluster to join: it has its own resources
            ray.init(log_to_driver=False, configure_logging=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     object_store_memory=object_store_mb << 20)
        started = True
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def _map_partitions(count: int, fn: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """`fn(k, **kwargs)` for every partition k as a Ray Data map (one block per partition); results
    (small dicts of plain values) sorted by k."""
    import ray.data

    ds = ray.data.from_items([{"part": k} for k in range(count)], override_num_blocks=max(count, 1))
    out = ds.map(_Task(fn, kwargs), num_cpus=1).take_all()
    results = [json.loads(r["result"]) for r in out]
    return sorted(results, key=lambda r: r["part"])


class _Task:
    """A picklable row function: {"part": k} -> {"result": json of fn(k, **kwargs)}."""

    def __init__(self, fn: Any, kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, kwargs

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        k = int(row["part"])
        result = self.fn(k, **self.kwargs)
        return {"result": json.dumps({"part": k, **result})}


# --- filters -----------------------------------------------------------------------------------


def plan_passes(filters: list[Filter]) -> list[tuple[list[Filter], list[Filter]]]:
    """The passes of `filters._drive`: (local filters, global filters whose signatures it computes)
    per pass; the last pass has no global filters. Consecutive global filters about conversations
    share a pass."""
    passes = []
    i = 0
    while True:
        g = next((j for j in range(i, len(filters)) if filters[j].scope == "global"), len(filters))
        h = g
        while h < len(filters) and filters[h].scope == "global" and (
                h == g or filters[h].unit == "conversations" and filters[h - 1].unit == "conversations"):
            h += 1
        passes.append((filters[i:g], filters[g:h]))
        if g == h:
            return passes
        i = h


def _ipc(df: pl.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_ipc(path, compression="lz4")
    return str(path)


def _read_ipcs(paths: list[str]) -> list[pl.DataFrame]:
    return [pl.read_ipc(p) for p in paths]


def _load(k: int, raw: str, state: str | None, until: str | None, n: int) -> dict[str, pl.DataFrame]:
    """Partition k: the state a previous pass saved, else its raw logs as the Polars path loads them."""
    if state is not None:
        return _read_state(partition_folder(state, k))
    from alignloop.data.filters import _Disk

    observed = datetime.fromisoformat(until) if until else None
    return _Disk(Path(raw), Path(raw).parent / "unused", n, observed).load(k)


def _save_state(frames: dict[str, pl.DataFrame], folder: Path) -> None:
    """Frames as Arrow IPC files (conformed to their schemas, as the Polars path saves them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in to_arrow(frames).items():
        with pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)


def _read_state_tables(folder: Path) -> dict[str, pa.Table]:
    out = {}
    for name in TABLE_ORDER:
        path = folder / f"{name}.arrow"
        if path.is_file():
            with pa.OSFile(str(path), "rb") as source:
                out[name] = pa.ipc.open_file(source).read_all()
    return out


def _read_state(folder: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.from_arrow(t) for name, t in _read_state_tables(folder).items()}


def _filter_pass(k: int, *, number: int, n: int, work: str, raw: str, until: str | None,
                 pending: list[tuple[Filter, pl.DataFrame]], local: list[Filter], batch: list[Filter],
                 keep_inputs: bool) -> dict[str, Any]:
    """One partition's share of one pass (the body of the partition loop of `filters._drive`)."""
    w = Path(work)
    frames = _load(k, raw, str(w / f"state-{number - 1}") if number else None, until, n)
    out: dict[str, Any] = {"input": rows(frames) if number == 0 else None, "before": {}, "after": {},
                           "n_items": {}, "seconds": {}, "decisions": {}, "items": {}, "signatures": {}}
    for flt, decisions in pending:
        start = time.perf_counter()
        if flt is not pending[0][0]:
            out["before"][flt.name] = rows(frames)
        frames = flt.apply(frames, decisions)
        out["after"][flt.name] = rows(frames)
        out["seconds"][flt.name] = time.perf_counter() - start
    for flt in local:
        start = time.perf_counter()
        out["before"][flt.name] = rows(frames)
        items = flt.items(frames)
        decisions = flt.resolve(flt.signature(frames))
        unknown = decisions.join(items, on="id", how="anti").height
        if unknown:
            raise RuntimeError(f"filter {flt.name}: {unknown} decision(s) about items it was not given")
        frames = flt.apply(frames, decisions)
        out["after"][flt.name] = rows(frames)
        out["n_items"][flt.name] = items.height
        out["decisions"][flt.name] = _ipc(decisions, w / "decisions" / flt.name / f"part-{k:05d}.arrow")
        if keep_inputs:
            out["items"][flt.name] = _ipc(items, w / "items" / flt.name / f"part-{k:05d}.arrow")
        out["seconds"][flt.name] = time.perf_counter() - start
    for j, flt in enumerate(batch):
        start = time.perf_counter()
        if j == 0:
            out["before"][flt.name] = rows(frames)
        out["items"][flt.name] = _ipc(flt.items(frames), w / f"items-{number}" / flt.name / f"part-{k:05d}.arrow")
        out["signatures"][flt.name] = _ipc(flt.signature(frames),
                                           w / f"signatures-{number}" / flt.name / f"part-{k:05d}.arrow")
        out["seconds"][flt.name] = time.perf_counter() - start
    _save_state(frames, partition_folder(w / f"state-{number}", k))
    return out


@dataclass
class _Tally:
    n_items: int = 0
    before: dict[str, int] | None = None
    after: dict[str, int] | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.before, self.after = {}, {}
        self.decisions: list[pl.DataFrame] = []
        self.items: list[pl.DataFrame] = []


def _add(which: dict[str, int], counts: Mapping[str, int]) -> None:
    for key, v in counts.items():
        which[key] = which.get(key, 0) + v


def run_filters_ray(source: str | Path, out_dir: str | Path, config: FilterConfig | None = None,
                    partitions: int | None = None, work_dir: str | Path | None = None,
                    keep_inputs: bool = True) -> tuple[list[Path], FunnelReport]:
    """`filters.run_filters_on_disk` on Ray Data: the same files (rows and order) and report.

    Needs a running Ray or starts a local one (`ray_session`)."""
    from alignloop.data.filters import _dropped_rows, _filter_report, _no_decisions
    from alignloop.data.parts import repartition

    config = config or FilterConfig()
    t0 = time.perf_counter()
    n = partitions or config.partitions or _auto_partitions(count_rows(source), config.events_per_partition)
    filters = make_filters(config)
    tallies = {f.name: _Tally() for f in filters}
    input_rows: dict[str, int] = {}
    out_dir = Path(out_dir)
    with ray_session(), tempfile.TemporaryDirectory(prefix="alignloop-ray-filter-", dir=work_dir) as tmp:
        work = Path(tmp)
        info = repartition(source, work / "raw", n)
        until = info["observed_until"].isoformat() if info["observed_until"] is not None else None
        pending: list[tuple[Filter, pl.DataFrame]] = []
        passes = plan_passes(filters)
        for number, (local, batch) in enumerate(passes):
            results = _map_partitions(n, _filter_pass, number=number, n=n, work=str(work), raw=str(work / "raw"),
                                      until=until, pending=pending, local=local, batch=batch,
                                      keep_inputs=keep_inputs)
            if number:
                shutil.rmtree(work / f"state-{number - 1}", ignore_errors=True)
            for r in results:
                if r["input"] is not None:
                    _add(input_rows, r["input"])
                for name, counts in r["before"].items():
                    _add(tallies[name].before, counts)
                for name, counts in r["after"].items():
                    _add(tallies[name].after, counts)
                for name, s in r["seconds"].items():
                    tallies[name].seconds += s
                for flt in local:
                    t = tallies[flt.name]
                    t.n_items += r["n_items"][flt.name]
                    t.decisions.extend(_read_ipcs([r["decisions"][flt.name]]))
                    if keep_inputs:
                        t.items.extend(_read_ipcs([r["items"][flt.name]]))
            pending = []
            gone = pl.DataFrame(schema={"conversation_id": pl.String})
            for flt in batch:  # the global step, as `filters._drive` resolves it
                t = tallies[flt.name]
                start = time.perf_counter()
                items = pl.concat(_read_ipcs([r["items"][flt.name] for r in results]))
                items = items.join(gone, left_on="id", right_on="conversation_id", how="anti")
                t.n_items += items.height
                if keep_inputs:
                    t.items.append(items)
                signature = pl.concat(_read_ipcs([r["signatures"][flt.name] for r in results]))
                if "conversation_id" in signature.columns and gone.height:
                    signature = signature.join(gone, on="conversation_id", how="anti")
                decisions = flt.resolve(signature)
                unknown = decisions.join(items, on="id", how="anti").height
                if unknown:
                    raise RuntimeError(f"filter {flt.name}: {unknown} decision(s) about items it was not given")
                t.decisions.append(decisions)
                t.seconds += time.perf_counter() - start
                pending.append((flt, decisions))
                if flt.unit == "conversations" and not (flt.name == "user_cap" and flt.config.mode == "weight"):
                    gone = pl.concat([gone, decisions.select(conversation_id="id")])
        final = work / f"state-{len(passes) - 1}"
        with PartitionedWriter(out_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
            for k in range(n):
                writer.write(_read_state_tables(partition_folder(final, k)))
        files = writer.close()
    report = FunnelReport(input_rows=input_rows, output_rows={})
    dropped = []
    previous = input_rows
    for flt in filters:
        t = tallies[flt.name]
        decisions = pl.concat(t.decisions) if t.decisions else _no_decisions()
        report.filters.append(_filter_report(flt, t.n_items, decisions, t.before, t.after, t.seconds))
        dropped.append(_dropped_rows(flt, decisions))
        if keep_inputs:
            report.inputs[flt.name] = (pl.concat(t.items) if t.items
                                       else pl.DataFrame(schema={"id": pl.String, "user_id": pl.String}))
        previous = t.after
    report.output_rows = dict(previous)
    if dropped:
        report.dropped = pl.concat(dropped)
    report.seconds = time.perf_counter() - t0
    return files, report


# --- build -------------------------------------------------------------------------------------


def _piece_name(name: str) -> str:
    return name.replace("/", "__")


def _build_task(k: int, *, folder: str, work: str, config: BuildConfig) -> dict[str, Any]:
    """One filtered partition's datasets, each piece written to the work folder in emit order."""
    from alignloop.data.builders import _bounded, iter_partition
    from alignloop.data.parts import read_partition

    frames = prepare(read_partition(folder, k, FILTERED_SCHEMAS))
    pieces: list[tuple[str, str]] = []
    skipped_total: dict[str, int] = {}
    for sub, part in enumerate(_bounded([frames], config.events_per_partition)):
        skipped: dict[str, int] = {}
        for name, df in iter_partition(part, config, skipped):
            path = Path(work) / f"part-{k:05d}" / f"{sub:04d}-{_piece_name(name)}.arrow"
            pieces.append((name, _ipc(df, path)))
            del df
        for key, v in skipped.items():
            skipped_total[key] = skipped_total.get(key, 0) + v
    return {"pieces": pieces, "skipped": skipped_total}


def build_datasets_ray(filtered: str | Path, config: BuildConfig | None = None, out_dir: str | Path = "datasets",
                       work_dir: str | Path | None = None) -> BuildReport:
    """`builders.build_datasets` on Ray Data, from a partitioned folder of filtered logs (as the
    filter stage writes it): the same files, rows and order, and the same report."""
    import pyarrow.parquet as pq

    from alignloop.data.builders import _emit, _emit_distill, _outputs, _Sinks
    from alignloop.data.stablehash import hash_column

    config = config or BuildConfig()
    t0 = time.perf_counter()
    folder = Path(filtered)
    n = partitions_in(folder)
    if n is None:
        raise ValueError(f"{folder}: not a partitioned folder of filtered logs (no partitions.json)")
    out_dir = Path(out_dir)
    outputs = _outputs(config)
    report = BuildReport(datasets={name: {"rows": 0, "users": 0} for name in outputs}, partitions=n)
    with ray_session(), tempfile.TemporaryDirectory(prefix="alignloop-ray-build-", dir=work_dir) as tmp:
        results = _map_partitions(n, _build_task, folder=str(folder), work=tmp, config=config)
        sinks = _Sinks(out_dir, list(config.formats))
        spill = out_dir / ".distill-spill.parquet"
        spill_writer: pq.ParquetWriter | None = None
        try:
            for name, schema in outputs.items():
                sinks.open(name, schema)
            for r in results:  # partition order, then the order each partition emitted
                for name, path in r["pieces"]:
                    df = pl.read_ipc(path)
                    if name == "distill":
                        if "_key" not in df.columns:
                            df = df.with_columns(_key=pl.lit(None, pl.UInt64))
                        order = (hash_column(df, "example_id", "distill", unique=False)
                                 if config.distill.max_prompts is not None else pl.lit(0, pl.UInt64))
                        table = df.with_columns(_h=order).to_arrow()
                        if spill_writer is None:
                            out_dir.mkdir(parents=True, exist_ok=True)
                            spill_writer = pq.ParquetWriter(spill, table.schema, compression="lz4")
                        spill_writer.write_table(table)
                    elif name.startswith("rm/"):
                        for split in ("train", "eval"):
                            _emit(sinks, report, f"{name}/{split}", df.filter(pl.col("split") == split))
                    else:
                        _emit(sinks, report, name, df)
                    del df
                    Path(path).unlink()
                for key, v in r["skipped"].items():
                    report.skipped[key] = report.skipped.get(key, 0) + v
            if spill_writer is not None:
                spill_writer.close()
                spill_writer = None
                _emit_distill(sinks, report, spill, config.distill)
        except BaseException as e:
            if spill_writer is not None:
                spill_writer.close()
            sinks.abort(e)
            raise
        finally:
            spill.unlink(missing_ok=True)
        report.files = [str(p) for p in sinks.close()]
    report.seconds = time.perf_counter() - t0
    return report


# --- the pipeline ------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    engine: str
    partitions: int
    tables: Path
    datasets: Path
    funnel: FunnelReport
    build: BuildReport
    seconds: float


def run_pipeline(source: str | Path | Mapping[str, pa.Table | pl.DataFrame], out_dir: str | Path,
                 filter_config: FilterConfig | None = None, build_config: BuildConfig | None = None,
                 engine: Engine = "polars", partitions: int | None = None, keep_inputs: bool = False,
                 work_dir: str | Path | None = None) -> PipelineResult:
    """Filter logs and build every dataset: `out_dir/tables/` and `out_dir/datasets/`.

    `source`: a log folder (or the log tables in memory: written to a temporary folder first).
    `partitions`: user partitions (default: `filter_config.partitions`, else ~`events_per_partition`
    events each); the filtered tables and the datasets are identical on both engines for the same
    count. `engine="polars"` runs the partitions one after another in this process (all in memory
    when there is one); `engine="ray"` maps them over Ray Data (a local Ray unless one is running).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    filter_config = filter_config or FilterConfig()
    build_config = build_config or BuildConfig()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tables_dir, datasets_dir = out_dir / "tables", out_dir / "datasets"
    with contextlib.ExitStack() as stack:
        if not isinstance(source, (str, Path)):
            from alignloop.data.io import write_tables
            from alignloop.data.schema import SCHEMAS

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alignloop-logs-", dir=work_dir)))
            write_tables(tmp, {k: v.to_arrow() if isinstance(v, pl.DataFrame) else v
                               for k, v in source.items() if k in SCHEMAS})
            source = tmp
        n = partitions or filter_config.partitions or _auto_partitions(count_rows(source),
                                                                       filter_config.events_per_partition)
        if engine == "ray":
            with ray_session():
                _, funnel = run_filters_ray(source, tables_dir, filter_config, n, work_dir, keep_inputs)
                build = build_datasets_ray(tables_dir, build_config, datasets_dir, work_dir)
        else:
            if n == 1:  # all in memory, as `alignloop logs filter` does for one partition
                from alignloop.data.io import read_logs

                filtered, funnel = run_filters(read_logs(source), filter_config, keep_inputs=keep_inputs)
                with PartitionedWriter(tables_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
                    writer.write(to_arrow(filtered))
                writer.close()
                del filtered
            else:
                _, funnel = run_filters_on_disk(source, tables_dir, filter_config, n, work_dir=work_dir,
                                                keep_inputs=keep_inputs)
            build = build_datasets(tables_dir, build_config, datasets_dir)
    return PipelineResult(engine=engine, partitions=n, tables=tables_dir, datasets=datasets_dir, funnel=funnel,
                          build=build, seconds=time.perf_counter() - t0)


__all__ = ["ENGINES", "Engine", "PipelineResult", "build_datasets_ray", "plan_passes", "ray_available",
           "ray_session", "run_filters_ray", "run_pipeline"]
