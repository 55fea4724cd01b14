"""The flywheel's optional preference stage: off by default, where it runs, what it trains on."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignloop.errors import AlignloopError
from alignloop.flywheel import stages as fw_stages
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.report import SECTIONS
from alignloop.flywheel.stage import planned_stages
from alignloop.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.toml"
QUICK = ["preference.train.steps=2", "preference.train.micro_batch=2", "preference.train.max_seq_len=128",
         "preference.train.eval_fraction=0", "preference.train.save_every=2", "preference.train.bf16=false"]


def _recipe(tmp_path, *overrides):
    return load_recipe(SMOKE, FlywheelRecipe, [f"run.dir={tmp_path}", *overrides])


def test_off_by_default_and_between_sft_and_the_reward_models(tmp_path):
    assert "preference" not in planned_stages(_recipe(tmp_path))
    recipe = _recipe(tmp_path, "preference.enabled=true")
    assert planned_stages(recipe) == ["simulate", "filter", "build", "sft", "preference", "rm", "rl", "eval", "abtest"]
    assert recipe.preference.train.loss == "ld_dpo" and "preference" in SECTIONS


def test_the_loss_is_said_once_and_sets_the_trainers_defaults(tmp_path):
    simpo = _recipe(tmp_path, "preference.loss=simpo").preference
    assert simpo.train.loss == "simpo" and simpo.train.beta == 2.0
    with pytest.raises(AlignloopError, match="set the loss as preference.loss"):
        _recipe(tmp_path, "preference.loss=kto", "preference.train.loss=dpo")


def _turn(tmp_path, *overrides) -> fw_stages.Turn:
    recipe = _recipe(tmp_path, "preference.enabled=true", *QUICK, *overrides)
    return fw_stages.Turn(recipe, "fw", 1, deployed="tiny", model="tiny")


@pytest.mark.parametrize("loss", ["ld_dpo", "kto"])
def test_stage_trains_from_the_newest_model_on_the_turns_build(tmp_path, loss):
    turn = _turn(tmp_path, f"preference.loss={loss}")
    build = turn.dir("build")
    build.mkdir(parents=True)
    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "dpo_demo.jsonl").read_text().splitlines()]
    if loss == "kto":
        (build / "rm" / "thumbs").mkdir(parents=True)
        answers = [{"user_id": r["user_id"], "messages": r["prompt"] + [{"role": "assistant", "content": text}],
                    "label": 1.0 if side == "chosen" else -1.0}
                   for r in rows[:16] for side in ("chosen", "rejected")
                   for text in [r[side] if isinstance(r[side], str) else r[side][-1]["content"]]]
        pq.write_table(pa.Table.from_pylist(answers), build / "rm" / "thumbs" / "train.parquet")
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "rejected": r["rejected"] if isinstance(r["rejected"], list)
                                              else [{"role": "assistant", "content": r["rejected"]}]}
                                             for r in rows[:16]]), build / "dpo.parquet")
    summary = fw_stages.preference(turn, False)
    assert turn.model == summary["model"] and summary["model"].endswith("turn-1/dpo/model")
    assert Path(summary["model"]).is_dir() and summary["loss"] == loss
    assert summary["train"]["steps"] == 2
