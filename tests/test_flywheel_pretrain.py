"""The flywheel's optional pre-training: a random-init preset learns first, and turn 1 deploys the result."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignloop.errors import AlignloopError
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.stage import run_flywheel
from alignloop.flywheel.stages import pretrain_base
from alignloop.models import load_model
from alignloop.models.deepseek import DeepseekForCausalLM
from alignloop.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path) -> FlywheelRecipe:
    return load_recipe(ROOT / "recipes" / "quickstart_moe.toml", FlywheelRecipe, [
        f"run.dir={tmp_path}", "pretrain.train.steps=2", "pretrain.train.micro_batch=2",
        "pretrain.train.max_seq_len=64", "pretrain.train.eval_fraction=0", "pretrain.train.eval_every=0",
        "pretrain.train.save_every=2", "pretrain.data.sim_users=5", "pretrain.data.chitchat=false"])


def test_pretrain_stage_writes_the_model_turn_one_deploys_and_is_skipped_when_done(tmp_path):
    recipe = _recipe(tmp_path)
    model = pretrain_base(recipe, "moe", force=False)
    assert Path(model) == tmp_path / "moe" / "pretrain" / "model"
    net, _ = load_model(model)
    assert isinstance(net, DeepseekForCausalLM)
    before = (Path(model) / "model.safetensors").stat().st_mtime_ns
    assert pretrain_base(recipe, "moe", force=False) == model  # up to date: not retrained
    assert (Path(model) / "model.safetensors").stat().st_mtime_ns == before


def test_from_pretrain_is_a_stage_only_when_switched_on(tmp_path):
    recipe = _recipe(tmp_path)
    recipe.pretrain.enabled = False
    with pytest.raises(AlignloopError, match="--from pretrain: not a stage"):
        run_flywheel(recipe, "x", from_stage="pretrain")
