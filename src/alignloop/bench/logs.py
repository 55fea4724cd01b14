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

`run_memory_check` streams a bigger world (default 10M events) through the on-disk path in a
child process -- simulate block by block into Parquet, `filters.run_filters_on_disk` (user
partitions of ~1M events), `builders.build_datasets` from the partitioned folder -- and reports
the child's peak resident memory (`getrusage` max RSS).
"""

from __future__ import annotations

import gc
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from alignloop.data.builders import BuildConfig
from alignloop.data.filters import FILTERED_SCHEMAS, TABLE_ORDER, FilterConfig

EVENTS_PER_USER = 70  # about, over 14 days with the default world (sizes the user pool; blocks stop early)
KEYS = {"users": "user_id", "sessions": "session_id", "conversations": "conversation_id", "turns": "turn_id",
        "events": "event_id", "labels": "turn_id", "weights": "conversation_id", "target_flags": "turn_id"}
MEMORY_LIMIT_GIB = 4


def default_block_users(events: int) -> int:
    """Users per simulated block: about eight blocks for the target, so the world stops near it."""
    return max(64, min(8192, events // (8 * EVENTS_PER_USER)))


def world_config(events: int, seed: int = 0, block_users: int | None = None) -> Any:
    from alignloop.sim import SimConfig

    block_users = block_users or default_block_users(events)
    users = max(block_users, math.ceil(2 * events / EVENTS_PER_USER))
    return SimConfig(seed=seed, users=users, days=14, block_users=block_users)


def iter_world(events: int, seed: int = 0, block_users: int | None = None):
    """Log tables of simulated blocks of users, until at least `events` events came."""
    from alignloop.sim import simulate_blocks

    n = 0
    for logs, _ in simulate_blocks(world_config(events, seed, block_users)):
        yield logs
        n += logs["events"].num_rows
        if n >= events:
            return


def simulate_world(events: int, seed: int = 0, block_users: int | None = None) -> dict[str, pa.Table]:
    """The five log tables of a world with at least `events` events, plus its derived labels."""
    from alignloop.data.labels import derive_labels

    blocks: dict[str, list[pa.Table]] = {}
    for logs in iter_world(events, seed, block_users):
        for name, table in logs.items():
            blocks.setdefault(name, []).append(table)
    tables = {name: pa.concat_tables(parts) for name, parts in blocks.items()}
    tables["labels"] = derive_labels(tables)
    return tables


def run_ours(tables: dict[str, pa.Table], out_dir: Path, filter_config: FilterConfig | None = None,
             build_config: BuildConfig | None = None) -> dict[str, pl.DataFrame]:
    from alignloop.data.builders import build_datasets
    from alignloop.data.filters import run_filters

    filtered, _ = run_filters(tables, filter_config or FilterConfig(), keep_inputs=False)
    build_datasets(filtered, build_config or BuildConfig(), out_dir)
    return filtered


def run_peer(tables: dict[str, pa.Table], out_dir: Path, filter_config: FilterConfig | None = None,
             build_config: BuildConfig | None = None) -> dict[str, Any]:
    from alignloop.bench.logs_pandas import (
        build_datasets_pandas,
        run_filters_pandas,
        to_pandas,
    )

    filtered = run_filters_pandas(to_pandas(tables), filter_config or FilterConfig())
    build_datasets_pandas(filtered, build_config or BuildConfig(), out_dir)
    return filtered


def _sorted(df: pl.DataFrame, key: str) -> pl.DataFrame:
    return df.sort(key)


def compare(ours_tables: dict[str, pl.DataFrame], ours_dir: Path, peer_tables: dict[str, Any], peer_dir: Path
            ) -> list[str]:
    """Differences between the two sides' outputs after sorting (empty: identical)."""
    from alignloop.data.filters import to_arrow
    from alignloop.data.schema import conform

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


# Ask the allocators to hand freed memory back to the OS at once (Polars: jemalloc; pyarrow:
# mimalloc). Otherwise freed pages stay resident for a while and RSS overstates what is in use.
PROMPT_RELEASE = {"_RJEM_MALLOC_CONF": "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0",
                  "MIMALLOC_PURGE_DELAY": "0"}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # Linux: KiB


class _RssSampler:
    """The largest resident set seen since the last `reset` (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / (1 << 30)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, self.now())

    def reset(self) -> float:
        peak, self.peak = max(self.peak, self.now()), self.now()
        return peak

    def stop(self) -> None:
        self._stop.set()


def stream_pipeline(events: int, folder: Path, seed: int = 0, filter_config: FilterConfig | None = None,
                    build_config: BuildConfig | None = None) -> dict[str, Any]:
    """Simulate (block by block, straight to Parquet) -> filter on disk -> build, in this process."""
    from alignloop.data.builders import build_datasets
    from alignloop.data.filters import run_filters_on_disk
    from alignloop.data.io import TableWriter
    from alignloop.data.schema import LOG_SCHEMAS

    sampler = _RssSampler()
    phases: dict[str, dict[str, float]] = {}

    def phase(name: str, start: float) -> None:
        gc.collect()
        phases[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(sampler.reset(), 3)}

    start = time.perf_counter()
    n = 0
    with TableWriter(folder / "logs", LOG_SCHEMAS) as writer:
        for logs in iter_world(events, seed):
            writer.write(logs)
            n += logs["events"].num_rows
            del logs
    phase("simulate", start)
    start = time.perf_counter()
    _, report = run_filters_on_disk(folder / "logs", folder / "tables", filter_config or FilterConfig(),
                                    work_dir=folder, keep_inputs=False)
    events_out = report.output_rows.get("events")
    del report
    phase("filter", start)
    start = time.perf_counter()
    build = build_datasets(folder / "tables", build_config or BuildConfig(), folder / "datasets")
    phase("build", start)
    sampler.stop()
    return {"events": n, "events_out": events_out, "partitions": build.partitions,
            "examples": sum(d["rows"] for d in build.datasets.values()), "phases": phases,
            "peak_rss_gib": round(_peak_rss_gib(), 3)}


def run_memory_check(events: int = 10_000_000, seed: int = 0, work_dir: str | Path | None = None,
                     timeout: float | None = None, prompt_release: bool = True) -> dict[str, Any]:
    """Stream ~`events` events through simulate -> filter -> build in a child process; its peak RSS
    (`getrusage` max RSS of the child, which does nothing else)."""
    import os

    env = {**os.environ, **(PROMPT_RELEASE if prompt_release else {})}
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-memory-", dir=work_dir) as tmp:
        cmd = [sys.executable, "-m", "alignloop.bench.logs", "stream", str(events), tmp, str(seed)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory check failed ({done.returncode}):\n{done.stderr[-4000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
    return {"bench": "logs-memory", "events": child["events"], "peak_rss_gib": child["peak_rss_gib"],
            "limit_gib": MEMORY_LIMIT_GIB, "under_limit": child["peak_rss_gib"] < MEMORY_LIMIT_GIB,
            "partitions": child["partitions"], "examples": child["examples"], "phases": child["phases"],
            "prompt_release": prompt_release}


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "stream":
        seed = int(argv[3]) if len(argv) > 3 else 0
        print(json.dumps(stream_pipeline(int(argv[1]), Path(argv[2]), seed)))
        return
    events = int(argv[0]) if argv else 1_000_000
    rounds = int(argv[1]) if len(argv) > 1 else 2
    print(json.dumps(run_bench(events, rounds=rounds)))


if __name__ == "__main__":
    main(sys.argv[1:])
