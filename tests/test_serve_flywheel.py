"""A flywheel turn with `deploy = "server"`: the tiny model behind a real server, simulated users over
HTTP, and the turn's logs read from the server's log store (equal, row for row, to what the users did)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.stage import run_flywheel
from alignloop.recipes import load_recipe

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.toml"


def test_a_turn_deployed_on_the_server_runs_end_to_end(tmp_path):
    recipe = load_recipe(SMOKE, FlywheelRecipe, [f"run.dir={tmp_path}", "flywheel.deploy=server", "world.users=40",
                                                  "world.days=3", "next_world.engine.max_batch=8",
                                                  # the tiny model's random answers draw no thumbs up and no
                                                  # reports in a world this small: those heads cannot train
                                                  'rm.heads=["preference", "continue", "returned_1d"]',
                                                  "rm.combine.safety=none"])
    state = run_flywheel(recipe, run="served")
    turn = state["turns"][0]
    sim = turn["summaries"]["simulate"]
    assert sim["responder"] == "server:base" and sim["server"]["requests"] > 0
    folder = tmp_path / "served" / "turn-1" / "simulate"
    for table in ("users", "sessions", "conversations", "turns", "events"):
        served = pq.read_table(folder / "logs" / f"{table}.parquet")
        simulated = pq.read_table(folder / "sim_logs" / f"{table}.parquet")
        key = served.column_names[0]
        assert served.num_rows == simulated.num_rows > 0, table
        assert sorted(served.column(key).to_pylist()) == sorted(simulated.column(key).to_pylist()), table
    # The answers users saw are the served model's, and the version is on every conversation.
    versions = set(pq.read_table(folder / "logs" / "conversations.parquet").column("model_version").to_pylist())
    assert versions == {"base"}
    assert "abtest" in turn["summaries"] and (tmp_path / "served" / "report.html").exists()
    report = (tmp_path / "served" / "report.html").read_text()
    assert f"{sim['server']['requests']:,} answers generated over HTTP by version base" in report
    # Conversations go on over several exchanges: the server's prefix cache spared part of their prompts.
    assert 0 < sim["server"]["cached_tokens"] < sim["server"]["prompt_tokens"]
    assert "prefix cache" in report.split("answers generated over HTTP")[1].split("<")[0]
