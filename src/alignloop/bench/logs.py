"""`alignloop bench logs`: simulate -> filter -> build on ~1M events, ours (Polars) vs pandas.

Work: a simulated world grown block by block until it holds at least `events` events (seeded, so
every run sees the same logs), with its derived labels (`alignloop.data.labels`, computed once,
outside the timing: both sides get the same input tables). Then each side, timed on its own:

    ours   `filters.run_filters` (default `FilterConfig`, in memory) + `builders.build_datasets`
           (default `BuildConfig`) writing every dataset as Parquet
    peer   `logs_pandas`: the same stages written plainly in pandas (Arrow -> pandas included),
           writing the same datasets as Parquet

The outputs are compared after a deterministic sort (filtered tables by their id column,
datasets by `example_id`): `identical` says every filtered table and every dataset holds the
same rows. Metric: input events per second of filter + build (simulation excluded).

`run_memory_check` runs a bigger world (default 10M events) the way a user would: simulated
block by block into a Parquet log folder, then the real `alignloop logs filter` and `alignloop
logs build` commands on it, each in its own process (user partitions of ~1M events streamed from
disk), and reports each process's peak resident memory (`wait4` max RSS).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from alignloop.data.builders import BuildConfig, build_datasets
from alignloop.data.filters import FILTERED_SCHEMAS, TABLE_ORDER, FilterConfig, run_filters, to_arrow
from alignloop.data.io import TableWriter
from alignloop.data.labels import derive_labels
from alignloop.data.schema import LOG_SCHEMAS, conform
from alignloop.sim import SimConfig, simulate_blocks

EVENTS_PER_USER = 70  # about, over 14 days with the default world (sizes the user pool; blocks stop early)
KEYS = {"users": "user_id", "sessions": "session_id", "conversations": "conversation_id", "turns": "turn_id",
        "events": "event_id", "labels": "turn_id", "weights": "conversation_id", "target_flags": "turn_id"}
MEMORY_LIMIT_GIB = 4


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


def run_ours(tables: dict[str, pa.Table], out_dir: Path, filter_config: FilterConfig | None = None,
             build_config: BuildConfig | None = None) -> dict[str, pl.DataFrame]:
    filtered, _ = run_filters(tables, filter_config or FilterConfig(), keep_inputs=False)
    build_datasets(filtered, build_config or BuildConfig(), out_dir)
    return filtered


def run_peer(tables: dict[str, pa.Table], out_dir: Path, filter_config: FilterConfig | None = None,
             build_config: BuildConfig | None = None) -> dict[str, Any]:
    # The pandas peer needs pandas, which only the `dev` and `ray` extras install.
    from alignloop.bench.logs_pandas import build_datasets_pandas, run_filters_pandas, to_pandas

    filtered = run_filters_pandas(to_pandas(tables), filter_config or FilterConfig())
    build_datasets_pandas(filtered, build_config or BuildConfig(), out_dir)
    return filtered


def _sorted(df: pl.DataFrame, key: str) -> pl.DataFrame:
    return df.sort(key)


def compare(ours_tables: dict[str, pl.DataFrame], ours_dir: Path, peer_tables: dict[str, Any], peer_dir: Path
            ) -> list[str]:
    """Differences between the two sides' outputs after sorting (empty: identical)."""
    diffs = []
    ours_arrow = to_arrow(ours_tables)
    for name in TABLE_ORDER:
        a = pl.from_arrow(ours_arrow[name])
        b = pl.from_arrow(conform(name, pa.Table.from_pandas(peer_tables[name], preserve_index=False),
                                  FILTERED_SCHEMAS))
        if a.height != b.height:
            diffs.append(f"table {name}: {a.height} rows vs {b.height}")
        elif not _sorted(a, KEYS[name]).equals(_sorted(b, KEYS[name])):
            diffs.append(f"table {name}: same count, different rows")
    ours_files = {str(p.relative_to(ours_dir)) for p in ours_dir.rglob("*.parquet")}
    peer_files = {str(p.relative_to(peer_dir)) for p in peer_dir.rglob("*.parquet")}
    if ours_files != peer_files:
        diffs.append(f"dataset files differ: {sorted(ours_files ^ peer_files)}")
    for name in sorted(ours_files & peer_files):
        a = pl.read_parquet(ours_dir / name)
        b = pl.read_parquet(peer_dir / name)
        if a.height != b.height:
            diffs.append(f"dataset {name}: {a.height} rows vs {b.height}")
            continue
        if a.height == 0:
            continue
        if set(a.columns) != set(b.columns):
            diffs.append(f"dataset {name}: columns {a.columns} vs {b.columns}")
            continue
        b = b.select(a.columns).cast(dict(a.schema))
        if not _sorted(a, "example_id").equals(_sorted(b, "example_id")):
            diffs.append(f"dataset {name}: same count, different rows")
    return diffs


def _timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process: every thread)."""
    gc.collect()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - start, time.process_time() - cpu


def run_bench(events: int = 1_000_000, seed: int = 0, rounds: int = 2, work_dir: str | Path | None = None
              ) -> dict[str, Any]:
    """Time filter + build, ours vs pandas, on a simulated world of ~`events` events.

    With `rounds` > 1 the sides alternate and each keeps its fastest round (the machine's other
    load then falls on both alike). `identical` compares the outputs of the first round.
    """
    tables = simulate_world(events, seed)
    n = tables["events"].num_rows
    ours_s = peer_s = ours_cpu = peer_cpu = float("inf")
    diffs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-logs-", dir=work_dir) as tmp:
        for r in range(max(rounds, 1)):
            ours_dir, peer_dir = Path(tmp) / f"ours-{r}", Path(tmp) / f"peer-{r}"
            ours, wall, cpu = _timed(run_ours, tables, ours_dir)
            ours_s, ours_cpu = min(ours_s, wall), min(ours_cpu, cpu)
            peer, wall, cpu = _timed(run_peer, tables, peer_dir)
            peer_s, peer_cpu = min(peer_s, wall), min(peer_cpu, cpu)
            if r == 0:
                diffs = compare(ours, ours_dir, peer, peer_dir)
                examples = sum(pl.scan_parquet(p).select(pl.len()).collect().item()
                               for p in ours_dir.rglob("*.parquet"))
            del ours, peer
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(peer_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "bench": "logs", "ours": round(n / ours_s, 1), "peer": round(n / peer_s, 1), "unit": "events/s",
        "ratio": round(peer_s / ours_s, 2), "events": n, "identical": not diffs,
        "seconds": {"ours": round(ours_s, 2), "peer": round(peer_s, 2)},
        "cpu_seconds": {"ours": round(ours_cpu, 2), "peer": round(peer_cpu, 2)},
        "examples": examples, "rounds": max(rounds, 1),
    }
    if diffs:
        out["differences"] = diffs
    return out


# --- memory ------------------------------------------------------------------------------------


# The libraries' own allocator settings (Polars: jemalloc, pyarrow: mimalloc). `alignloop logs ...`
# overrides them to hand freed memory back at once (see `alignloop.cli`); `prompt_release=False`
# measures the commands with these instead.
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
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_DEFAULTS}
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
            "simulate": _child([py, "-m", "alignloop.bench.logs", "simulate", str(events), str(tmp / "logs"), str(seed)],
                               env, tmp / "simulate.log", timeout),
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
    if len(argv) >= 3 and argv[0] == "simulate":
        seed = int(argv[3]) if len(argv) > 3 else 0
        print(json.dumps({"events": simulate_to_folder(int(argv[1]), Path(argv[2]), seed)}))
        return
    events = int(argv[0]) if argv else 1_000_000
    rounds = int(argv[1]) if len(argv) > 1 else 2
    print(json.dumps(run_bench(events, rounds=rounds)))


if __name__ == "__main__":
    main(sys.argv[1:])
