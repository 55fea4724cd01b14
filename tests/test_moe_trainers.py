"""SFT, DPO and distillation on a DeepSeek-style MoE policy (tiny-deepseek): each trains, balances its
experts' load after every step, and saves a model that loads back as our DeepSeek model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignloop.models import load_model
from alignloop.models.deepseek import DeepseekForCausalLM
from alignloop.recipes import load_recipe
from alignloop.train.config import DistillRecipe, DPORecipe, SFTRecipe
from alignloop.train.stage import run_distill, run_dpo, run_sft

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHORT = ["model.name=tiny-deepseek", "train.steps=3", "train.save_every=3", "train.eval_every=0",
         "train.max_seq_len=128", "train.micro_batch=2"]


def _check(stage) -> list[dict]:
    rows = [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert all("moe/maxvio" in r for r in steps)  # the bias update ran and logged the load
    net, _ = load_model(str(stage.path("model")))
    assert isinstance(net, DeepseekForCausalLM)
    return steps


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_on_an_moe_policy(tmp_path, lora):
    extra = [] if lora else ["train.lora=none"]
    recipe = load_recipe(RECIPES / "sft_tiny.toml", SFTRecipe, [f"run.dir={tmp_path}", *SHORT, *extra])
    _check(run_sft(recipe))


def test_dpo_on_an_moe_policy(tmp_path):
    recipe = load_recipe(RECIPES / "dpo_tiny.toml", DPORecipe, [f"run.dir={tmp_path}", *SHORT])
    _check(run_dpo(recipe))


def test_logit_distillation_into_an_moe_student(tmp_path):
    recipe = load_recipe(RECIPES / "distill_tiny.toml", DistillRecipe,
                         [f"run.dir={tmp_path}", *SHORT, "teacher.name=tiny-deepseek", "teacher.seed=1"])
    _check(run_distill(recipe))
