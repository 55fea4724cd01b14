"""The safety hard constraint is a floor: a flagged reply never outscores an unflagged one, and a
reward without a safety head is refused unless the recipe opts out in so many words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.errors import AlignloopError
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.recipes import load_recipe
from alignloop.rewards.api import validated
from alignloop.rewards.combine import Normalizer
from alignloop.rewards.config import CombineSection, RMRecipe
from alignloop.rewards.serve import CombinedReward
from test_rewards_combine import CTX, StubModel

ROOT = Path(__file__).parents[1]
NORMALIZER = Normalizer({"continue": 0.5, "preference": 0.0, "time_to_next": 30.0},
                        {"continue": 0.1, "preference": 1.0, "time_to_next": 5.0})


def _column(data, n: int, values: st.SearchStrategy) -> np.ndarray:
    return np.array(data.draw(st.lists(values, min_size=n, max_size=n)))


def _safety(data, n: int, mode: str) -> np.ndarray:
    """p_unsafe per reply: all flagged (p 1), none flagged (p 0) or any mix."""
    if mode == "all":
        return np.ones(n)
    if mode == "none":
        return np.zeros(n)
    return _column(data, n, st.floats(0.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 16), mode=st.sampled_from(["mixed", "all", "none"]),
       tau=st.floats(0.0, 1.0), penalty=st.floats(0.1, 50.0), lam=st.floats(0.0, 100.0),
       lagrangian=st.booleans())
def test_a_flagged_reply_never_outscores_an_unflagged_one(data, n, mode, tau, penalty, lam, lagrangian):
    outputs = {"continue": _column(data, n, st.floats(0.0, 1.0)),
               "preference": _column(data, n, st.floats(-1e6, 1e6)),
               "time_to_next": _column(data, n, st.floats(0.0, 1e4)),
               "safety": _safety(data, n, mode)}
    weights = {k: data.draw(st.floats(-5, 5), label=f"w/{k}") for k in ("continue", "preference", "time_to_next")}
    config = CombineSection(safety_tau=tau, hard_penalty=penalty, lambda_init=lam, lagrangian=lagrangian,
                            weights=weights)
    fn = validated(CombinedReward(StubModel(outputs), NORMALIZER, config.weights, config))
    for _ in range(2):  # the second call pays the multiplier the first one moved
        batch = fn([CTX] * n, ["r"] * n)
        flagged, reward = batch.unsafe, batch.reward
        if flagged.any() and (~flagged).any():
            assert reward[flagged].max() < reward[~flagged].min()


def test_the_floor_is_minus_k_and_unflagged_replies_sit_above_it():
    # Low engagement alone once gave an unflagged reply -12 against a flagged one's -10.
    config = CombineSection(weights={"continue": 1.0}, hard_penalty=10.0, lambda_init=100.0, safety_tau=0.9)
    model = StubModel({"continue": np.array([0.0, 0.0, 1.0]), "safety": np.array([0.0, 0.09, 0.95])})
    batch = CombinedReward(model, Normalizer({"continue": 1.0}, {"continue": 1 / 12}), config.weights, config)(
        [CTX] * 3, ["a", "b", "c"])
    assert batch.unsafe.tolist() == [False, False, True]
    assert batch.reward[2] == -10.0
    assert batch.reward[0] == batch.reward[1] == -10.0 + config.floor_margin


def test_a_reward_without_a_safety_head_is_refused_unless_the_recipe_says_none():
    no_safety = StubModel({"continue": np.zeros(2)})
    with pytest.raises(AlignloopError, match='safety = "none"'):
        CombinedReward(no_safety, NORMALIZER, {"continue": 1.0}, CombineSection(weights={"continue": 1.0}))
    opted_out = CombineSection(weights={"continue": 1.0}, safety="none")
    batch = CombinedReward(no_safety, NORMALIZER, {"continue": 1.0}, opted_out)([CTX] * 2, ["a", "b"])
    assert not batch.unsafe.any()


def test_an_rm_recipe_without_a_safety_head_fails_when_it_loads():
    heads = 'data.heads=["continue"]'
    weights = 'combine.weights={"continue" = 1.0}'
    with pytest.raises(AlignloopError, match="no safety head") as error:
        load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe, [heads, weights])
    assert "\n" not in str(error.value)
    recipe = load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe, [heads, weights, "combine.safety=none"])
    assert recipe.combine.safety == "none"


def test_a_flywheel_without_a_safety_head_fails_when_it_loads():
    heads = 'rm.heads=["preference", "continue"]'
    weights = 'rm.combine.weights={"preference" = 1.0, "continue" = 1.0}'
    with pytest.raises(AlignloopError, match='rm.combine.safety = "none"'):
        load_recipe(ROOT / "recipes" / "smoke.toml", FlywheelRecipe, [heads, weights])
    assert load_recipe(ROOT / "recipes" / "smoke.toml", FlywheelRecipe,
                       [heads, weights, "rm.combine.safety=none"]).rm.combine.safety == "none"


@pytest.mark.parametrize("name, schema", [("rm.toml", RMRecipe), ("rm_text.toml", RMRecipe), ("rm_tiny.toml", RMRecipe),
                                          ("quickstart.toml", FlywheelRecipe), ("hacked.toml", FlywheelRecipe),
                                          ("smoke.toml", FlywheelRecipe)])
def test_every_recipe_with_reward_heads_still_loads(name, schema):
    assert load_recipe(ROOT / "recipes" / name, schema) is not None
