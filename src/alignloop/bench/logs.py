"""`alignloop bench logs`: filter + build on ~1M simulated events, ours (Polars) vs DuckDB.

Work: a simulated world grown block by block until it holds at least `events` events (seeded, so
every run sees the same logs), with its derived labels, written once as a Parquet log folder
(untimed). Then each side, timed from reading that folder to the last dataset file written:

    ours   `io.read_logs` (pyarrow), `filters.run_filters` (default `FilterConfig`, in memory) and
           `builders.build_datasets` (default `BuildConfig`): Polars, eager and lazy
    peer   `logs_duckdb`: the same stages in DuckDB SQL (`read_parquet` into tables of an
           in-memory database, window functions, `DELETE`, `COPY ... TO` Parquet), the same knobs

Metric: input events per second of read + filter + build (simulation excluded); the same count on
both sides. Rounds: a warm-up of each side, then `rounds` >= 3 timed rounds alternating who goes
first (`harness.alternate_rounds`); median, min and max per side, and the CPU seconds of each
round (all threads) beside them.

Same settings on both sides:
- threads: `threads` (default every core this process may use) for Polars (its pool is sized once,
  from POLARS_MAX_THREADS, when Polars loads: the CLI sets it first, and `run_bench` re-runs itself
  in a child process with it when this process's pool has another size), for pyarrow's pool
  (`pa.set_cpu_count`: reads, ours's parallel gathers of message strings, and its dataset writers,
  at most two background threads) and for DuckDB (`threads`); the MinHash blocks, the one numpy
  step both sides share, run on Polars' thread count;
- Parquet: every dataset file with ours's settings (`dataset_writer.PARQUET`): zstd at level 1, min/max
  statistics on every column (DuckDB cannot leave them out), row groups of 122,880 rows (DuckDB's
  default); dictionary encoding: none in ours, DuckDB's default (columns with few distinct values);
- DuckDB as its documentation recommends: `threads`, `preserve_insertion_order = false`, the
  default memory limit;
- allocators: each side runs in a worker process of its own, both started with the settings
  `alignloop logs filter` and `logs build` use for logs held in memory (`freed_memory`: Polars'
  jemalloc and pyarrow's mimalloc keep freed pages until the process exits), so ours reuses in
  every round the pages its warm-up faulted in, as DuckDB reuses its own. DuckDB allocates with a
  jemalloc of its own, which these settings do not reach; its own knobs
  (`allocator_flush_threshold` and `allocator_bulk_deallocation_flush_threshold` at 16GB,
  `allocator_background_threads`) did not make it faster (17.3-17.5 s a round as it comes,
  17.7-19.5 s with them; 2 cores).

What differs, inherently: RE2's `\\b` is ASCII-only and DuckDB's `lower` maps letter to letter
(see `logs_duckdb`: neither shows on these logs); ours computes a funnel report (rows before and
after every filter, decisions with reasons), the peer only the dropped ids; ours writes each file
under a temporary name, syncs it and renames it (`runs.atomic_path`), DuckDB writes it in place.

Identical outputs: after the warm-up, both sides' filtered tables (sorted by their id), the ids
each filter dropped, and every dataset file (sorted by `example_id`; the Parquet files and the RL
prompts' JSONL, which both sides write) are compared; `identical` in
the JSON line says whether all are equal, `differences` lists what is not.

`run_memory_check` (off by default in the CLI: simulating 10M events alone takes over five minutes
on two cores) runs a bigger world the way a user would: simulated block by block into a Parquet
log folder, then the real `alignloop logs filter` and `alignloop logs build` commands on it, each
in its own process, and reports each one's peak resident memory (`wait4` max RSS).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from pyarrow import feather

from alignloop import freed_memory
from alignloop.bench.harness import alternate_rounds, bench_threads, headline, machine_facts, summary
from alignloop.bench.peer_process import WorkerProcess
from alignloop.data.builders import PARQUET, BuildConfig, build_datasets
from alignloop.data.filters import FILTERED_SCHEMAS, TABLE_ORDER, FilterConfig, run_filters, to_arrow
from alignloop.data.io import TableWriter, read_logs, write_tables
from alignloop.data.labels import derive_labels
from alignloop.data.schema import LOG_SCHEMAS, conform
from alignloop.sim import SimConfig, simulate_blocks
from alignloop.ui import say

EVENTS_PER_USER = 70  # about, over 14 days with the default world (sizes the user pool; blocks stop early)
KEYS = {"users": "user_id", "sessions": "session_id", "conversations": "conversation_id", "turns": "turn_id",
        "events": "event_id", "labels": "turn_id", "weights": "conversation_id", "target_flags": "turn_id"}
MEMORY_LIMIT_GIB = 4


# --- the world -----------------------------------------------------------------------------------


def default_block_users(events: int) -> int:
    """Users per simulated block: about eight blocks for the target, so the world stops near it."""
    return max(64, min(8192, events // (8 * EVENTS_PER_USER)))


def world_config(events: int, seed: int = 0, block_users: int | None = None) -> SimConfig:
    block_users = block_users or default_block_users(events)
    users = max(block_users, math.ceil(2 * events / EVENTS_PER_USER))
    return SimConfig(seed=seed, users=users, days=14, block_users=block_users)


def iter_world(events: int, seed: int = 0, block_users: int | None = None):
    """Log tables of simulated blocks of users, until at least `events` events came."""
    n = 0
    for logs, _ in simulate_blocks(world_config(events, seed, block_users)):
        yield logs
        n += logs["events"].num_rows
        if n >= events:
            return


def simulate_world(events: int, seed: int = 0, block_users: int | None = None) -> dict[str, pa.Table]:
    """The five log tables of a world with at least `events` events, plus its derived labels."""
    blocks: dict[str, list[pa.Table]] = {}
    for logs in iter_world(events, seed, block_users):
        for name, table in logs.items():
            blocks.setdefault(name, []).append(table)
    tables = {name: pa.concat_tables(parts) for name, parts in blocks.items()}
    tables["labels"] = derive_labels(tables)
    return tables


def write_world(events: int, folder: Path, seed: int = 0) -> int:
    """A simulated world (with labels) as a Parquet log folder; returns its events."""
    tables = simulate_world(events, seed)
    write_tables(folder, tables, FILTERED_SCHEMAS)
    return tables["events"].num_rows


# --- the two sides -------------------------------------------------------------------------------


def run_ours(folder: Path, out_dir: Path, filter_config: FilterConfig | None = None,
             build_config: BuildConfig | None = None) -> tuple[dict[str, pl.DataFrame], pl.DataFrame]:
    """Ours on a log folder: (filtered frames, dropped ids: filter, id)."""
    filtered, report = run_filters(read_logs(folder), filter_config or FilterConfig(), keep_inputs=False)
    build_datasets(filtered, build_config or BuildConfig(), out_dir)
    return filtered, report.dropped.select("filter", "id")


def run_duckdb(folder: Path, out_dir: Path, threads: int, filter_config: FilterConfig | None = None,
               build_config: BuildConfig | None = None, keep: bool = False
               ) -> tuple[dict[str, pa.Table], pl.DataFrame] | None:
    """The DuckDB peer on a log folder; with `keep`, (filtered tables, dropped ids) fetched after the
    work is done (only the bench's untimed warm-up keeps them)."""
    from alignloop.bench.logs_duckdb import (
        ParquetSettings,
        build_datasets_duckdb,
        connect,
        fetch_tables,
        load_logs,
        run_filters_duckdb,
    )

    con = connect(threads)
    try:
        load_logs(con, folder)
        run_filters_duckdb(con, filter_config or FilterConfig())
        build_datasets_duckdb(con, build_config or BuildConfig(), out_dir, ParquetSettings(**PARQUET))
        if not keep:
            return None
        return fetch_tables(con), pl.from_arrow(con.sql("FROM dropped").to_arrow_table())
    finally:
        con.close()


# --- comparing outputs ---------------------------------------------------------------------------


def _frame(table: pa.Table | pl.DataFrame, name: str) -> pl.DataFrame:
    arrow = table.to_arrow() if isinstance(table, pl.DataFrame) else table
    return pl.from_arrow(conform(name, arrow, FILTERED_SCHEMAS))


def compare(ours: tuple[dict[str, Any], pl.DataFrame], ours_dir: Path, peer: tuple[dict[str, Any], pl.DataFrame],
            peer_dir: Path) -> list[str]:
    """Differences between the two sides' outputs (empty: identical): the filtered tables sorted by
    their id, the ids each filter dropped, and every dataset file sorted by example_id."""
    diffs = []
    ours_tables, ours_dropped = ours
    peer_tables, peer_dropped = peer
    ours_arrow = to_arrow(ours_tables)
    for name in TABLE_ORDER:
        a, b = _frame(ours_arrow[name], name), _frame(peer_tables[name], name)
        if a.height != b.height:
            diffs.append(f"table {name}: {a.height} rows vs {b.height}")
        elif not a.sort(KEYS[name]).equals(b.sort(KEYS[name])):
            diffs.append(f"table {name}: same count, different rows")
    for flt in sorted(set(ours_dropped["filter"]) | set(peer_dropped["filter"])):
        a = set(ours_dropped.filter(pl.col("filter") == flt)["id"])
        b = set(peer_dropped.filter(pl.col("filter") == flt)["id"])
        if a != b:
            diffs.append(f"dropped by {flt}: {len(a - b)} only ours, {len(b - a)} only the peer")
    ours_files, peer_files = _dataset_files(ours_dir), _dataset_files(peer_dir)
    if ours_files != peer_files:
        diffs.append(f"dataset files differ: {sorted(ours_files ^ peer_files)}")
    for name in sorted(ours_files & peer_files):
        a, b = _dataset(ours_dir / name), _dataset(peer_dir / name)
        if a.height != b.height:
            diffs.append(f"dataset {name}: {a.height} rows vs {b.height}")
        elif a.columns != b.columns:
            diffs.append(f"dataset {name}: columns {a.columns} vs {b.columns}")
        elif a.height and not a.sort("example_id").equals(b.cast(dict(a.schema)).sort("example_id")):
            diffs.append(f"dataset {name}: same count, different rows")
    return diffs


def _dataset_files(folder: Path) -> set[str]:
    """Every dataset file under `folder` (Parquet, and the JSONL both sides write), relative to it."""
    return {str(p.relative_to(folder)) for ext in ("parquet", "jsonl") for p in folder.rglob(f"*.{ext}")}


def _dataset(path: Path) -> pl.DataFrame:
    """A dataset file as a frame: Parquet, or JSONL read with its Parquet twin's schema (JSON has
    no types of its own for the comparison to hold both sides to)."""
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    twin = path.with_suffix(".parquet")
    schema = pl.read_parquet_schema(twin) if twin.exists() else None
    return pl.read_ndjson(path, schema=schema)


def dataset_rows(folder: Path) -> int:
    return sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in folder.rglob("*.parquet"))


# --- each side in its own process --------------------------------------------------------------


def _save_kept(tables: Mapping[str, pa.Table | pl.DataFrame], dropped: pl.DataFrame, folder: Path) -> None:
    """A side's filtered tables and dropped ids, as Arrow IPC files, for the comparison."""
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in to_arrow(dict(tables)).items():
        feather.write_feather(table, folder / "tables" / f"{name}.arrow", compression="uncompressed")
    dropped.write_ipc(folder / "dropped.arrow")


def _load_kept(folder: Path) -> tuple[dict[str, pa.Table], pl.DataFrame]:
    tables = {p.stem: feather.read_table(p) for p in sorted((folder / "tables").glob("*.arrow"))}
    return tables, pl.read_ipc(folder / "dropped.arrow")


def _round(side: str, logs: Path, out: Path, threads: int, keep: Path | None) -> dict[str, float]:
    """One whole run of a side into a fresh folder, timed around the work (wall, and CPU seconds of
    every thread of this process). With `keep`, its filtered tables and dropped ids are saved
    there after the clock stopped."""
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    result = run_ours(logs, out) if side == "ours" else run_duckdb(logs, out, threads, keep=keep is not None)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if keep is not None:
        assert result is not None
        _save_kept(*result, keep)
    return {"seconds": seconds, "cpu_seconds": cpu}


def _serve(side: str, logs: Path, threads: int) -> None:
    """`worker SIDE LOGS THREADS`: one side of the bench, a round for each request read on stdin
    ({"out": folder, "keep": folder or null}), one JSON reply per line on stdout (`WorkerProcess`)."""
    pipe, sys.stdout = sys.stdout, sys.stderr  # nothing but replies on the pipe

    def reply(obj: dict[str, Any]) -> None:
        pipe.write(json.dumps(obj) + "\n")
        pipe.flush()

    pa.set_cpu_count(threads)
    reply({"ready": True, "facts": {"polars_threads": pl.thread_pool_size(), "pyarrow_threads": pa.cpu_count(),
                                    "allocators": freed_memory.settings()}})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("cmd") == "quit":
            return
        try:
            keep = Path(request["keep"]) if request.get("keep") else None
            reply(_round(side, logs, Path(request["out"]), threads, keep))
        except Exception as e:  # noqa: BLE001 - the parent raises it, with this process's log
            reply({"error": f"{type(e).__name__}: {e}"})


def _worker(side: str, logs: Path, threads: int) -> WorkerProcess:
    # Both sides under the allocator settings `alignloop logs filter` and `logs build` run logs
    # held in memory with (`freed_memory`: keep freed pages). DuckDB allocates with a jemalloc of
    # its own, which these settings do not reach.
    env = {**freed_memory.environment("keep"), "POLARS_MAX_THREADS": str(threads)}
    return WorkerProcess(f"bench logs {side}", [sys.executable, "-m", "alignloop.bench.logs", "worker", side,
                                                str(logs), str(threads)], env, start_timeout_s=300)


def _side(worker: WorkerProcess, out: Path, keep: Path, events: int) -> Any:
    """A harness configuration: a round in the side's worker. The first (the warm-up) keeps its
    filtered tables and dropped ids, for the comparison."""
    first = True

    def once() -> dict[str, Any]:
        nonlocal first
        request = {"out": str(out), "keep": str(keep) if first else None}
        first = False
        return {"useful": events, **worker.request(request, "a round")}

    return once


# --- the bench -----------------------------------------------------------------------------------


def run_bench(events: int = 1_000_000, seed: int = 0, rounds: int = 3, threads: int | None = None,
              work_dir: str | Path | None = None) -> dict[str, Any]:
    """Time read + filter + build, ours vs DuckDB, on a simulated world of ~`events` events; the
    JSON line (`harness.headline`) with `identical`, the settings and the machine.

    Each side runs in a worker process of its own, started with POLARS_MAX_THREADS = `threads`
    (Polars sizes its pool once, when it loads) and kept for the warm-up and every round: neither
    side runs on the heap the other left behind. In one process, ours ran 1-1.5 s slower (of ~10)
    after a DuckDB round than after its own.
    """
    threads = bench_threads(threads)
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-logs-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        say(f"bench logs: simulating ~{events} events")
        n = write_world(events, tmp / "logs", seed)
        say("bench logs: starting a worker process for each side")
        with contextlib.ExitStack() as stack:
            workers = {}
            for side in ("ours", "duckdb"):
                workers[side] = _worker(side, tmp / "logs", threads)
                stack.callback(workers[side].close)
            configs = {side: _side(w, tmp / side, tmp / f"{side}-kept", n) for side, w in workers.items()}
            results = alternate_rounds(configs, rounds=rounds, label="bench logs")
            facts = workers["ours"].ready["facts"]
        diffs = compare(_load_kept(tmp / "ours-kept"), tmp / "ours", _load_kept(tmp / "duckdb-kept"), tmp / "duckdb")
        examples = {"ours": dataset_rows(tmp / "ours"), "duckdb": dataset_rows(tmp / "duckdb")}
    ours, peer = summary(results["ours"]), summary(results["duckdb"])
    line = headline(
        "logs", ours, peer, "events/s",
        ours_config="pyarrow read_logs + Polars run_filters + build_datasets (in memory, default configs)",
        peer_config="DuckDB SQL: read_parquet, filters as window functions + DELETE, datasets by COPY TO parquet",
        machine=machine_facts(threads, peers=("polars", "duckdb", "pyarrow")),
        events=n, identical=not diffs,
        # Useful work is the input events, the same on both sides; what each side made of them:
        accounting={side: {"events_in": n, "examples_out": examples[side]} for side in results},
        cpu_seconds={side: _median([r["cpu_seconds"] for r in results[side]]) for side in results},
        wall_seconds={side: _median([r["seconds"] for r in results[side]]) for side in results},
        processes="one worker process per side, for the warm-up and every round",
        parquet={**PARQUET, "statistics": "min/max, every column", "dictionary": "ours: none; DuckDB: its default"},
        threads={"polars": facts["polars_threads"], "pyarrow": facts["pyarrow_threads"], "duckdb": threads},
        allocators={"ours": facts["allocators"],
                    "duckdb": "its own jemalloc, as it comes (allocator_flush_threshold, "
                              "allocator_bulk_deallocation_flush_threshold at 16GB and background threads: "
                              "no faster)"},
        duckdb_settings={"threads": threads, "preserve_insertion_order": False, "memory_limit": "default (80% of RAM)"},
    )
    if diffs:
        line["differences"] = diffs
    return line


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


# --- memory ------------------------------------------------------------------------------------


# The libraries' own allocator settings (Polars: jemalloc, pyarrow: mimalloc). `alignloop logs ...`
# chooses its own (`freed_memory`: streamed logs hand freed memory back at once);
# `prompt_release=False` measures the commands with these instead.
LIBRARY_DEFAULTS = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:500,muzzy_decay_ms:1000", "MIMALLOC_PURGE_DELAY": "10"}


def simulate_to_folder(events: int, folder: Path, seed: int = 0) -> int:
    """Simulate block by block straight into a Parquet log folder; returns the events written."""
    n = 0
    with TableWriter(folder, LOG_SCHEMAS) as writer:
        for logs in iter_world(events, seed):
            writer.write(logs)
            n += logs["events"].num_rows
            del logs
    return n


def _child(cmd: list[str], env: dict[str, str], log: Path, timeout: float | None) -> dict[str, Any]:
    """Run one child process; its wall seconds and peak resident memory (its own `wait4` rusage)."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.send_signal(signal.SIGKILL)
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"memory check: {cmd[3:]} ran past {timeout}s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    if proc.returncode != 0:
        raise RuntimeError(f"memory check failed ({proc.returncode}): {cmd[3:]}\n"
                           f"{log.read_text(errors='replace')[-4000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / (1 << 20), 3)}


def run_memory_check(events: int = 10_000_000, seed: int = 0, work_dir: str | Path | None = None,
                     timeout: float | None = None, prompt_release: bool = True) -> dict[str, Any]:
    """The streamed path at scale, as a user runs it: a world of ~`events` events simulated into a
    log folder (one child process), then `alignloop logs filter` and `alignloop logs build` on it
    (one child each, the real commands: user partitions of ~1M events on disk). Each child's peak
    resident memory comes from its own rusage; nothing is added to the commands' environment.
    `prompt_release=False`: the commands keep the libraries' default allocator settings."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_DEFAULTS and k != freed_memory.CHOSEN}
    if not prompt_release:
        env.update(LIBRARY_DEFAULTS)
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-memory-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        recipe = tmp / "logs.toml"
        recipe.write_text(f'[run]\nname = "memory"\ndir = {json.dumps(str(tmp / "runs"))}\n\n'
                          f'[filter]\nsource = {json.dumps(str(tmp / "logs"))}\nground_truth = "none"\n',
                          encoding="utf-8")
        py = sys.executable
        phases = {
            "simulate": _child([py, "-m", "alignloop.bench.logs", "simulate", str(events), str(tmp / "logs"),
                                str(seed)], env, tmp / "simulate.log", timeout),
            "filter": _child([py, "-m", "alignloop.cli", "--quiet", "logs", "filter", str(recipe)], env,
                             tmp / "filter.log", timeout),
            "build": _child([py, "-m", "alignloop.cli", "--quiet", "logs", "build", str(recipe)], env,
                            tmp / "build.log", timeout),
        }
        filtered = json.loads((tmp / "runs" / "memory" / "filter" / "manifest.json").read_text(encoding="utf-8"))
        built = json.loads((tmp / "runs" / "memory" / "build" / "build_report.json").read_text(encoding="utf-8"))
    peak = max(p["peak_rss_gib"] for k, p in phases.items() if k != "simulate")
    return {"bench": "logs-memory", "events": filtered["rows_in"]["events"], "peak_rss_gib": peak,
            "limit_gib": MEMORY_LIMIT_GIB, "under_limit": peak < MEMORY_LIMIT_GIB,
            "partitions": built["partitions"], "examples": sum(d["rows"] for d in built["datasets"].values()),
            "phases": phases, "prompt_release": prompt_release, "allocators": filtered.get("allocators")}


def main(argv: list[str]) -> None:
    """`simulate EVENTS FOLDER [SEED]` (the memory check's first child) or
    `worker SIDE LOGS THREADS` (one side of the bench, `_serve`)."""
    if argv and argv[0] == "simulate":
        seed = int(argv[3]) if len(argv) > 3 else 0
        print(json.dumps({"events": simulate_to_folder(int(argv[1]), Path(argv[2]), seed)}))
        return
    if argv and argv[0] == "worker":
        _serve(argv[1], Path(argv[2]), int(argv[3]))
        return
    raise SystemExit("usage: python -m alignloop.bench.logs simulate EVENTS FOLDER [SEED] | "
                     "worker SIDE LOGS THREADS")


if __name__ == "__main__":
    main(sys.argv[1:])
