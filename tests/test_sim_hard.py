"""The hard simulated world: bots that pass as people, partial skimmers, distracted and low-effort
people, flipped thumbs. Off by default (the default world is unchanged); on, the filters miss."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from alignloop.data.filters import FilterConfig, filter_precision_recall, run_filters
from alignloop.sim import SimConfig, simulate
from alignloop.sim.config import HARD, Difficulty
from alignloop.sim.world import describe_world, world_tag

WORLD = {"seed": 1, "users": 400, "days": 5, "bot_fraction": 0.06, "skimmer_fraction": 0.12}


def _frames(world):
    logs, truth = world
    return ({k: pl.from_arrow(v) for k, v in logs.items()}, {k: pl.from_arrow(v) for k, v in truth.items()})


@pytest.fixture(scope="module")
def default_world():
    return simulate(SimConfig(**WORLD))


@pytest.fixture(scope="module")
def hard_world():
    return simulate(SimConfig(**WORLD, hard=True))


def _pr(world):
    logs, truth = world
    _, report = run_filters(logs, FilterConfig())
    return filter_precision_recall(report, truth)


def test_knobs_off_leave_the_default_world_as_it_was(default_world):
    # The default world's id is a hash of its config dump: unchanged means every id in its logs is too.
    assert world_tag(SimConfig()) == "fa9779e8"
    assert set(SimConfig().model_dump()).isdisjoint({"hard", "mimic_bots", "label_noise"})
    assert "difficulty" not in describe_world(SimConfig())
    zeros = SimConfig(**WORLD, mimic_bots=0, partial_skimmers=0, distracted_readers=0, low_effort_people=0,
                      label_noise=0)
    assert world_tag(zeros) == world_tag(SimConfig(**WORLD))
    logs, truth = simulate(zeros)
    for name, table in default_world[0].items():
        assert logs[name].equals(table), name
    for name, table in default_world[1].items():
        assert truth[name].equals(table), name


def test_the_hard_preset_and_its_knobs():
    assert SimConfig().difficulty() == Difficulty() and not Difficulty().on
    assert SimConfig(hard=True).difficulty() == HARD
    mixed = SimConfig(hard=True, label_noise=0.0, mimic_bots=1.0).difficulty()
    assert mixed.label_noise == 0.0 and mixed.mimic_bots == 1.0 and mixed.partial_skimmers == HARD.partial_skimmers
    assert SimConfig(label_noise=0.2).difficulty() == Difficulty(label_noise=0.2)
    assert world_tag(SimConfig(hard=True)) != world_tag(SimConfig())
    assert describe_world(SimConfig(hard=True))["difficulty"]["mimic_bots"] == HARD.mimic_bots
    for bad in ({"mimic_bots": 1.5}, {"hardness": True}, {"label_noise": -0.1}):
        with pytest.raises(ValidationError):
            SimConfig(**bad)


def test_filters_miss_in_a_hard_world_and_not_in_the_default_one(default_world, hard_world):
    easy, hard = _pr(default_world), _pr(hard_world)
    for name in ("bots", "min_reading"):
        print(f"{name}: default precision {easy[name]['precision']:.3f} recall {easy[name]['recall']:.3f}; "
              f"hard precision {hard[name]['precision']:.3f} recall {hard[name]['recall']:.3f}")
    assert hard["bots"]["tp"] + hard["bots"]["fn"] >= 10, "the hard world needs bots"
    for name in ("bots", "min_reading"):
        assert easy[name]["precision"] >= 0.9 and easy[name]["recall"] >= 0.8, name  # as test_filters requires
        assert hard[name]["precision"] < 1 or hard[name]["recall"] < 1, name
        assert (hard[name]["precision"] + hard[name]["recall"]) < (easy[name]["precision"] + easy[name]["recall"])
    assert hard["bots"]["recall"] < 0.8  # bots that pass as people are not caught


def _user_stats(world) -> pl.DataFrame:
    """Per user: kind, distinct share of messages, median and spread of reply times, share of ~0 s reads."""
    L, T = _frames(world)
    msgs = (L["turns"].filter(pl.col("role") == "user").join(L["conversations"].select("conversation_id", "user_id"),
                                                              on="conversation_id")
            .group_by("user_id").agg(n=pl.len(), distinct=pl.col("text").n_unique() / pl.len()))
    gaps = (L["events"].sort("conversation_id", "timestamp")
            .with_columns(gap=pl.when(pl.col("conversation_id") == pl.col("conversation_id").shift(1))
                          .then((pl.col("timestamp") - pl.col("timestamp").shift(1)).dt.total_milliseconds() / 1000))
            .filter((pl.col("type") == "message") & pl.col("gap").is_not_null())
            .group_by("user_id").agg(median_reply=pl.col("gap").median(),
                                     reply_cv=pl.col("gap").std() / pl.col("gap").mean()))
    reads = (L["events"].filter(pl.col("type") == "read").group_by("user_id")
             .agg(glance=(pl.col("value") < 0.5).mean()))
    return (T["users"].select("user_id", "kind").join(msgs, on="user_id").join(gaps, on="user_id", how="left")
            .join(reads, on="user_id", how="left"))


def test_hard_users_look_like_people(default_world, hard_world):
    easy, hard = _user_stats(default_world), _user_stats(hard_world)
    bots = hard.filter((pl.col("kind") == "bot") & (pl.col("n") >= 6))
    # Some bots replay scripts and reply in a second or two, as before; the others pass as people.
    passing = bots.filter(pl.col("distinct") > 0.5)
    assert passing.height >= 3 and bots.height - passing.height >= 3
    people = hard.filter((pl.col("kind") == "normal") & (pl.col("n") >= 6))
    assert passing["median_reply"].min() > 4.0
    assert 0.5 < passing["median_reply"].median() / people["median_reply"].median() < 2.0
    assert abs(passing["reply_cv"].median() - people["reply_cv"].median()) < 0.1
    assert passing["glance"].max() < 0.2
    old = easy.filter((pl.col("kind") == "bot") & (pl.col("n") >= 6))
    assert old["distinct"].max() <= 0.5 and old["median_reply"].max() < 4.0
    # Skimmers: every read a glance before; now some read a share of what they are shown.
    assert easy.filter(pl.col("kind") == "skimmer")["glance"].min() > 0.4
    skim = hard.filter(pl.col("kind") == "skimmer")["glance"].drop_nulls()
    assert (skim < 0.4).sum() >= 3 and (skim > 0.9).sum() >= 3
    # People: none glanced at most answers before; some do now.
    assert easy.filter(pl.col("kind") == "normal")["glance"].drop_nulls().max() < 0.5
    assert (hard.filter(pl.col("kind") == "normal")["glance"].drop_nulls() >= 0.5).sum() >= 3


def _thumb_agreement(world) -> float:
    """Share of thumbs that agree with the answer's true quality (up on quality > 0.5)."""
    L, T = _frames(world)
    votes = (L["events"].filter(pl.col("type") == "vote")
             .join(T["candidates"].select("turn_id", "quality"), on="turn_id")
             .join(T["users"].filter(pl.col("kind") == "normal").select("user_id"), on="user_id"))
    agree = ((votes["value"] > 0) == (votes["quality"] > 0.5)).to_numpy()
    return float(np.mean(agree))


def test_label_noise_flips_thumbs(default_world):
    noisy = simulate(SimConfig(**WORLD, label_noise=0.3))
    clean, flipped = _thumb_agreement(default_world), _thumb_agreement(noisy)
    assert clean > 0.75 and flipped < clean - 0.1
