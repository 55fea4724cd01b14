"""The flywheel runs more than one turn: turn 2's users talk to turn 1's model and its SFT trains."""

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from alignloop.data.builders import DATASET_SCHEMAS
from alignloop.errors import AlignloopError
from alignloop.flywheel import stage as fw_stage
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.stages import Turn, sft
from alignloop.recipes import load_recipe
from alignloop.runs import atomic_write_json

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.toml"


def _recipe(tmp_path, *overrides):
    return load_recipe(SMOKE, FlywheelRecipe, [f"run.dir={tmp_path}", *overrides])


def test_two_turns_on_the_smoke_recipe(tmp_path, monkeypatch):
    # rm, rl and eval add nothing to what turn 2 is about; a small A/B keeps it to ~2 minutes on 2 busy cores.
    recipe = _recipe(tmp_path, "flywheel.turns=2", 'flywheel.skip=["rm", "rl", "eval"]',
                     "abtest.world.users=8", "abtest.world.days=1")
    real = fw_stage.launch_decision

    def launch(summaries, **kwargs):  # the tiny models' A/B is a coin toss: turn 1's model is launched either way
        _, why = real(summaries, **kwargs)
        return True, [*why, "launched by the test"]

    monkeypatch.setattr(fw_stage, "launch_decision", launch)
    state = fw_stage.run_flywheel(recipe, run="turns")

    first, second = state["turns"]
    assert first["model"].endswith("turn-1/sft/model") and second["model"].endswith("turn-2/sft/model")
    assert "abtest" in first["summaries"] and "abtest" in second["summaries"]
    assert second["deployed"] == first["model"]
    logs = tmp_path / "turns" / "turn-2" / "simulate" / "logs"
    versions = pl.read_parquet(logs / "conversations.parquet")["model_version"].unique().to_list()
    assert versions == [f"engine:{first['model']}"]  # turn 2's users talked to turn 1's model
    assert second["summaries"]["sft"]["data"]["rows"] > 0


def test_an_empty_sft_set_is_one_line_before_training(tmp_path):
    turn = Turn(_recipe(tmp_path), "empty", 2, deployed="tiny", model="tiny")
    turn.dir("build").mkdir(parents=True)
    pq.write_table(DATASET_SCHEMAS["sft"].empty_table(), turn.dir("build") / "sft.parquet")
    atomic_write_json(turn.dir("build") / "manifest.json", {"skipped": {"sft:flagged_target": 59}})
    atomic_write_json(turn.dir("filter") / "manifest.json", {"filters": [
        {"name": "quality", "input": 307, "dropped": 299, "reasons": {"truncated": 299}}]})
    with pytest.raises(AlignloopError, match=r"turn 2 sft: .*sft\.parquet has no examples to train on .*"
                                             r"flagged_target': 59.*299 of 307 answers: \{'truncated': 299\}"):
        sft(turn, force=False)
    assert not turn.dir("sft").exists()  # said before training
