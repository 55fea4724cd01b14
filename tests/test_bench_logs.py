"""`alignloop bench logs` at a tiny size: ours (Polars) and the DuckDB peer give identical filtered
tables, dropped ids and datasets, with the default configuration and with one that takes the other
branches; the comparison catches a difference; the JSON line has what every bench line must carry.
No timing assertions."""

from __future__ import annotations

import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest

pytest.importorskip("duckdb")  # the peer; duckdb comes with the `dev` extra

from alignloop.bench.logs import compare, run_bench, run_duckdb, run_ours, write_world
from alignloop.data.builders import BuildConfig
from alignloop.data.filters import FilterConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logs")
    events = write_world(20_000, folder, seed=3)
    assert 15_000 <= events <= 40_000
    return folder


def _other() -> tuple[FilterConfig, BuildConfig]:
    fc = FilterConfig(order=["quality", "repeats", "bots", "diversity", "min_reading", "user_cap"])
    fc.diversity.max_character_share = 0.15
    fc.diversity.max_topic_share = 0.25
    fc.user_cap.max_conversations = 5
    fc.user_cap.max_examples = 40
    fc.user_cap.mode = "weight"
    bc = BuildConfig(max_context_messages=6, use_edits=False, include_system=False)
    bc.sft.source = "selected"
    bc.dpo.max_pairs_per_prompt = 1
    bc.dpo.require_swipe_event = True
    bc.rm.safety_negatives_per_positive = 2.0
    bc.distill.max_prompts = 200
    return fc, bc


@pytest.mark.parametrize("which", ["default", "other"])
def test_ours_and_duckdb_give_identical_outputs(world, tmp_path, which):
    fc, bc = (FilterConfig(), BuildConfig()) if which == "default" else _other()
    ours = run_ours(world, tmp_path / "ours", fc, bc)
    peer = run_duckdb(world, tmp_path / "peer", 2, fc, bc, keep=True)
    filtered, dropped = ours
    assert filtered["events"].height > 0 and pq.read_metadata(tmp_path / "ours" / "sft.parquet").num_rows > 0
    # The filters decided something here (all six with the other configuration), so comparing the
    # dropped ids is not vacuous.
    deciding = {"quality", "bots", "min_reading", "user_cap"}
    assert set(dropped["filter"]) == (deciding | {"repeats", "diversity"} if which == "other" else deciding)
    assert compare(ours, tmp_path / "ours", peer, tmp_path / "peer") == []


def test_compare_catches_a_missing_row_and_a_changed_value(world, tmp_path):
    ours = run_ours(world, tmp_path / "ours")
    peer = run_duckdb(world, tmp_path / "peer", 2, keep=True)
    shutil.copytree(tmp_path / "peer", tmp_path / "changed")
    sft = pl.read_parquet(tmp_path / "peer" / "sft.parquet")
    sft.slice(1).write_parquet(tmp_path / "changed" / "sft.parquet")
    dpo = pl.read_parquet(tmp_path / "peer" / "dpo.parquet")
    dpo.with_columns(weight=pl.col("weight") * 0.5).write_parquet(tmp_path / "changed" / "dpo.parquet")
    prompts = tmp_path / "changed" / "rl" / "train.jsonl"  # the RL prompts are compared as JSONL too
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[1:]))
    tables, dropped = peer
    tables = {**tables, "users": tables["users"].slice(1)}
    diffs = compare(ours, tmp_path / "ours", (tables, dropped.slice(1)), tmp_path / "changed")
    assert any(d.startswith("dataset sft.parquet:") for d in diffs)
    assert "dataset dpo.parquet: same count, different rows" in diffs
    assert any(d.startswith("dataset rl/train.jsonl:") for d in diffs)
    assert any(d.startswith("table users:") for d in diffs)
    assert any(d.startswith("dropped by") for d in diffs)


def test_the_json_line_carries_rounds_machine_and_identity(tmp_path):
    line = run_bench(events=3000, rounds=3, threads=1, work_dir=tmp_path)
    assert line["bench"] == "logs" and line["unit"] == "events/s" and line["rounds"] == 3
    assert line["identical"] is True and "differences" not in line
    assert line["ours"] > 0 and line["peer"] > 0 and line["ratio"] == round(line["ours"] / line["peer"], 2)
    assert line["ours_min_max"][0] <= line["ours"] <= line["ours_min_max"][1]
    machine = line["machine"]
    assert machine["threads"] == 1 and line["duckdb_settings"]["threads"] == 1
    assert all(machine["versions"][p] for p in ("polars", "duckdb", "pyarrow"))
    assert line["parquet"]["compression"] == "zstd"
    assert line["allocators"]["ours"]["ALIGNLOOP_FREED_MEMORY"] == "keep"  # as `logs filter` in memory
    accounting = line["accounting"]
    assert accounting["ours"] == accounting["duckdb"] and accounting["ours"]["events_in"] == line["events"] >= 3000


def test_memory_check_runs_the_real_commands(tmp_path):
    """The memory check simulates a log folder, then runs `alignloop logs filter` and `logs build`
    on it, each in its own process (started as the command, nothing added to its environment),
    and reports each one's peak memory."""
    from alignloop.bench.logs import run_memory_check

    out = run_memory_check(events=4000, work_dir=tmp_path, timeout=300)
    assert out["events"] >= 4000 and out["examples"] > 0 and out["partitions"] == 1
    assert set(out["phases"]) == {"simulate", "filter", "build"}
    assert all(p["peak_rss_gib"] > 0.05 for p in out["phases"].values())
    assert out["peak_rss_gib"] == max(out["phases"]["filter"]["peak_rss_gib"], out["phases"]["build"]["peak_rss_gib"])
    # One partition is filtered and built in memory: `alignloop logs ...` chose to keep freed pages
    # before Polars loaded (a 10M-event world streams, and restarts to hand them back).
    assert out["allocators"]["ALIGNLOOP_FREED_MEMORY"] == "keep"
    assert out["allocators"]["MIMALLOC_PURGE_DELAY"] == "-1"
    assert out["allocators"]["_RJEM_MALLOC_CONF"].endswith("dirty_decay_ms:-1,muzzy_decay_ms:-1")
