"""`alignloop bench logs` at a tiny size: ours (Polars) and the pandas peer give identical filtered
tables and datasets, with the default configuration and with one that takes the other branches.
No timing assertions."""

from __future__ import annotations

import pytest

pytest.importorskip("pandas")  # the peer implementation; pandas comes with the `ray` / `dev` extras

from alignloop.bench.logs import compare, run_ours, run_peer, simulate_world
from alignloop.data.builders import BuildConfig
from alignloop.data.filters import FilterConfig


@pytest.fixture(scope="module")
def world():
    tables = simulate_world(20_000, seed=3)
    assert 15_000 <= tables["events"].num_rows <= 40_000
    return tables


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
def test_ours_and_pandas_give_identical_outputs(world, tmp_path, which):
    fc, bc = (FilterConfig(), BuildConfig()) if which == "default" else _other()
    ours = run_ours(world, tmp_path / "ours", fc, bc)
    peer = run_peer(world, tmp_path / "peer", fc, bc)
    assert ours["events"].height > 0 and (tmp_path / "ours" / "sft.parquet").is_file()
    assert compare(ours, tmp_path / "ours", peer, tmp_path / "peer") == []


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
    # `alignloop logs ...` set the allocators to hand freed memory back, before Polars loaded.
    assert out["allocators"]["MIMALLOC_PURGE_DELAY"] == "0"
    assert out["allocators"]["_RJEM_MALLOC_CONF"].endswith("dirty_decay_ms:0,muzzy_decay_ms:0")
