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
2. Filters: the passes are the Polars path's (`filters.plan_passes`), and each task runs its
   partition's share of a pass with the same function (`filters.run_pass`): apply the global
   decisions of the previous pass, run the local filters (`signature -> resolve -> apply`, all
   inside the partition), compute the signatures of the next global filters (repeats,
   diversity). The driver adds the tasks' reports in partition order and resolves the global
   filters once (`filters.Tallies`) -- the same global step as the Polars path, so the same
   conversations are dropped.
3. The last pass writes each filtered partition; the driver appends them, in partition order,
   to the output tables (`parts.PartitionedWriter`).
4. Build: one task per filtered partition runs `builders.iter_partition` (cut by
   `builders.bounded_partitions` like `build_datasets` cuts it); the driver appends every piece
   in partition order to the builders' own `DatasetWriter`, which deduplicates and caps
   distillation prompts across partitions as `build_datasets` does.

Identical outputs: the Ray path writes the same rows in the same order as the Polars path given
the same partition count (the partition count is also the Ray parallelism; the Polars filters
give the same rows for any partition count, in partition-major order).

Ray is started locally when nothing is running (`ray_session`: `num_cpus`, no dashboard), and
stopped again afterwards; an already initialised Ray (a cluster) is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
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

from alignloop.data.builders import (
    BuildConfig,
    BuildReport,
    DatasetWriter,
    bounded_partitions,
    build_datasets,
    choose_sft_source,
    count_selects,
    iter_partition,
)
from alignloop.data.filters import (
    FILTERED_SCHEMAS,
    TABLE_ORDER,
    Filter,
    FilterConfig,
    FunnelReport,
    Pass,
    Tallies,
    auto_partitions,
    load_raw_partition,
    load_state,
    make_filters,
    plan_passes,
    prepare,
    run_filters,
    run_filters_on_disk,
    run_pass,
    save_state,
    to_arrow,
)
from alignloop.data.io import read_logs, write_tables
from alignloop.data.parts import (
    PartitionedWriter,
    count_rows,
    partition_folder,
    partitions_in,
    read_partition,
    read_scratch,
    repartition,
)
from alignloop.data.schema import SCHEMAS

Engine = Literal["polars", "ray"]
ENGINES: tuple[str, ...] = ("polars", "ray")


# --- Ray ---------------------------------------------------------------------------------------


def ray_available() -> bool:
    try:  # Ray is an optional extra (alignloop[ray]): imported only where the Ray engine runs
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def ray_session(num_cpus: int | None = 2, object_store_mb: int = 512) -> Iterator[None]:
    """A local Ray for the duration (started here, shut down after; `RAY_ADDRESS` set: that cluster),
    or the Ray already initialised in this process, as it is."""
    try:  # optional extra, see ray_available
        import ray
        import ray.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the Ray engine needs Ray Data: pip install "alignloop[ray]"') from e
    quiet = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    for name in quiet:  # Ray Data logs every execution at INFO level
        logging.getLogger(name).setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
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
    import ray.data  # optional extra, see ray_available; a ray_session is running

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


def _filter_pass(k: int, *, number: int, work: str, until: str | None, step: Pass,
                 pending: list[tuple[Filter, pl.DataFrame]], keep_inputs: bool) -> dict[str, Any]:
    """Partition k's share of pass `number`: `filters.run_pass` on the state the previous pass saved
    (or the raw partition); saves the new state and the pass's report (pickled) in the work folder."""
    w = Path(work)
    if number:
        frames = load_state(partition_folder(w / f"state-{number - 1}", k))
    else:
        frames = load_raw_partition(w / "raw", k, datetime.fromisoformat(until) if until else None)
    frames, out = run_pass(frames, step, pending, keep_inputs, first=number == 0)
    save_state(partition_folder(w / f"state-{number}", k), frames)
    path = w / f"reports-{number}" / f"part-{k:05d}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    return {"report": str(path)}


def run_filters_ray(source: str | Path, out_dir: str | Path, config: FilterConfig | None = None,
                    partitions: int | None = None, work_dir: str | Path | None = None,
                    keep_inputs: bool = True) -> tuple[list[Path], FunnelReport]:
    """`filters.run_filters_on_disk` on Ray Data: the same files (rows and order) and report.

    Needs a running Ray or starts a local one (`ray_session`)."""
    config = config or FilterConfig()
    t0 = time.perf_counter()
    n = partitions or config.partitions or auto_partitions(count_rows(source), config.events_per_partition)
    filters = make_filters(config)
    tallies = Tallies(filters, keep_inputs)
    out_dir = Path(out_dir)
    with ray_session(), tempfile.TemporaryDirectory(prefix="alignloop-ray-filter-", dir=work_dir) as tmp:
        work = Path(tmp)
        info = repartition(source, work / "raw", n)
        until = info["observed_until"].isoformat() if info["observed_until"] is not None else None
        pending: list[tuple[Filter, pl.DataFrame]] = []
        passes = plan_passes(filters)
        for number, step in enumerate(passes):
            results = _map_partitions(n, _filter_pass, number=number, work=str(work), until=until, step=step,
                                      pending=pending, keep_inputs=keep_inputs)
            shutil.rmtree(work / ("raw" if number == 0 else f"state-{number - 1}"), ignore_errors=True)
            for r in results:  # partition order
                tallies.add(step, pickle.loads(Path(r["report"]).read_bytes()))
            shutil.rmtree(work / f"reports-{number}", ignore_errors=True)
            pending = tallies.resolve(step)
        final = work / f"state-{len(passes) - 1}"
        with PartitionedWriter(out_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
            for k in range(n):
                writer.write(read_scratch(partition_folder(final, k), FILTERED_SCHEMAS))
        files = writer.close()
    report = tallies.report()
    report.seconds = time.perf_counter() - t0
    return files, report


def filter_logs(source: str | Path, out_dir: str | Path, config: FilterConfig, partitions: int,
                engine: Engine = "polars", *, keep_inputs: bool = False, work_dir: str | Path | None = None
                ) -> tuple[list[Path], FunnelReport]:
    """The filtered tables of log folder `source`, written to `out_dir` as the filter stage writes them
    (partitions as row groups, `partitions.json`). Returns the files written and the report.

    One partition on Polars: all in memory (fastest). More: streamed through user partitions on
    disk, one in memory at a time. Ray: mapped over the partitions. Same files every way.
    """
    if engine == "ray":
        return run_filters_ray(source, out_dir, config, partitions, work_dir, keep_inputs)
    if partitions > 1:
        return run_filters_on_disk(source, out_dir, config, partitions, work_dir=work_dir, keep_inputs=keep_inputs)
    filtered, report = run_filters(read_logs(source), config, keep_inputs=keep_inputs)
    with PartitionedWriter(out_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
        writer.write(to_arrow(filtered))
    return writer.close(), report


# --- build -------------------------------------------------------------------------------------


def _build_task(k: int, *, folder: str, work: str, config: BuildConfig) -> dict[str, Any]:
    """One filtered partition's datasets (`builders.iter_partition`), each piece written to the work
    folder (Arrow IPC) in the order it came."""
    frames = prepare(read_partition(folder, k, FILTERED_SCHEMAS))
    pieces: list[tuple[str, str]] = []
    skipped_total: dict[str, int] = {}
    for sub, part in enumerate(bounded_partitions(frames, config.events_per_partition)):
        skipped: dict[str, int] = {}
        for name, table in iter_partition(part, config, skipped):
            path = Path(work) / f"part-{k:05d}" / f"{sub:04d}-{name.replace('/', '__')}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            pieces.append((name, str(path)))
            del table
        for key, v in skipped.items():
            skipped_total[key] = skipped_total.get(key, 0) + v
    return {"pieces": pieces, "skipped": skipped_total}


def build_datasets_ray(filtered: str | Path, config: BuildConfig | None = None, out_dir: str | Path = "datasets",
                       work_dir: str | Path | None = None) -> BuildReport:
    """`builders.build_datasets` on Ray Data, from a partitioned folder of filtered logs (as the
    filter stage writes it): the same files, rows and order, and the same report."""
    config = config or BuildConfig()
    t0 = time.perf_counter()
    folder = Path(filtered)
    n = partitions_in(folder)
    if n is None:
        raise ValueError(f"{folder}: not a partitioned folder of filtered logs (no partitions.json)")
    config, sft_choice = choose_sft_source(config, count_selects(folder)) if config.sft.enabled else (config, None)
    with ray_session(), tempfile.TemporaryDirectory(prefix="alignloop-ray-build-", dir=work_dir) as tmp:
        results = _map_partitions(n, _build_task, folder=str(folder), work=tmp, config=config)
        writer = DatasetWriter(out_dir, config, n, sft_choice)
        try:
            for r in results:  # partition order, then the order each partition emitted
                for name, path in r["pieces"]:
                    with pa.OSFile(path) as source:
                        table = pa.ipc.open_file(source).read_all()
                    writer.add(name, table)
                    del table
                    Path(path).unlink()
                writer.add_skipped(r["skipped"])
        except BaseException as e:
            writer.abort(e)
            raise
        report = writer.close()
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
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="alignloop-logs-", dir=work_dir)))
            write_tables(tmp, {k: v.to_arrow() if isinstance(v, pl.DataFrame) else v
                               for k, v in source.items() if k in SCHEMAS})
            source = tmp
        n = partitions or filter_config.partitions or auto_partitions(count_rows(source),
                                                                       filter_config.events_per_partition)
        if engine == "ray":
            with ray_session():  # one Ray for both stages
                _, funnel = filter_logs(source, tables_dir, filter_config, n, engine, keep_inputs=keep_inputs,
                                        work_dir=work_dir)
                build = build_datasets_ray(tables_dir, build_config, datasets_dir, work_dir)
        else:
            _, funnel = filter_logs(source, tables_dir, filter_config, n, engine, keep_inputs=keep_inputs,
                                    work_dir=work_dir)
            build = build_datasets(tables_dir, build_config, datasets_dir)
    return PipelineResult(engine=engine, partitions=n, tables=tables_dir, datasets=datasets_dir, funnel=funnel,
                          build=build, seconds=time.perf_counter() - t0)


__all__ = ["ENGINES", "Engine", "PipelineResult", "build_datasets_ray", "filter_logs", "plan_passes",
           "ray_available", "ray_session", "run_filters_ray", "run_pipeline"]
