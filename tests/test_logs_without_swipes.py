"""Logs of people talking to people, with no swipes and no safety reports (what the chitchat adapter
ingests): the quality filter leaves people's answers to the rules that can judge them, the build
says in one line why DPO and the preference and safety sets cannot train and which SFT source it
took, RL prompts come out split like the reward models, and the flywheel stops before training on
nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from alignloop.data.adapters.chitchat import MODEL_VERSION, chitchat_tables
from alignloop.data.builders import BuildConfig, build_datasets, build_partition, split_of
from alignloop.data.filters import FilterConfig, run_filters
from alignloop.errors import AlignloopError

ROOT = Path(__file__).resolve().parents[1]
NO_SWIPES = "these logs have no swipes (no turn has more than one candidate)"
DPO_LINE = f"dpo: 0 pairs — {NO_SWIPES}; DPO needs swiped or regenerated answers"
PREFERENCE_LINE = f"rm/preference: 0 pairs — {NO_SWIPES}; the preference head needs swiped or regenerated answers"
SFT_LINE = ("sft: source auto -> selected — these logs have no swipes (no select event); every selected answer "
            "the quality filter kept is a target")

# How people chat: many messages end without a full stop; none of them was cut at a token limit.
OPENERS = ["hey how was your weekend", "Do you like hiking?", "what music are you into lately",
           "I just got back from Italy!", "any good books you would recommend", "Cats or dogs?"]
ANSWERS = ["pretty good, went to the lake", "Yes I love it. The mountains here are great",
           "mostly jazz lately, some indie too", "No way! Where did you go?", "ok cool", "haha same here",
           "I read a lot of sci-fi, anything by Le Guin", "Dogs for sure :)"]
FOLLOWUPS = ["nice, which lake", "that sounds fun", "who do you listen to", "Rome and Florence mostly",
             "lol", "what else do you like"]


def _people(users: int = 40, per_user: int = 2) -> dict:
    """A small dataset in the chitchat package's own format: each user opens `per_user`
    conversations a few days apart with a partner who answers; most are rated."""
    start = datetime(2018, 5, 1, 12, tzinfo=UTC)
    data = {}
    for u in range(users):
        for c in range(per_user):
            t = start + timedelta(days=3 * c + u % 5, minutes=7 * u)
            messages = []
            for i in range(4 + (u + c) % 3):
                sender = f"user-{u}" if i % 2 == 0 else f"partner-{(u + c) % 7}"
                pool = (OPENERS if i == 0 else FOLLOWUPS) if i % 2 == 0 else ANSWERS
                text = pool[(u * 3 + c * 5 + i) % len(pool)]
                messages.append([{"text": text, "timestamp": (t + timedelta(minutes=2 * i)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"), "sender": sender}])
            rating = (u + c) % 9 + 1
            data[f"conv-{u:03d}-{c}"] = {"messages": messages, "start": messages[0][0]["timestamp"],
                                         "prompt": "", "ratings": {"witty": rating, "upbeat": rating,
                                                                   "interesting": rating}}
    return data


@pytest.fixture(scope="module")
def logs() -> dict[str, pa.Table]:
    return chitchat_tables(_people())


@pytest.fixture(scope="module")
def filtered(logs):
    return run_filters(logs, FilterConfig())


def _by_model(logs: dict[str, pa.Table], model_version: str) -> dict[str, pa.Table]:
    convs = pl.from_arrow(logs["conversations"]).with_columns(model_version=pl.lit(model_version))
    return {**logs, "conversations": convs.to_arrow()}


def test_truncated_judges_model_answers_only(logs, filtered):
    _, report = filtered
    quality = report["quality"]
    answers = pl.from_arrow(logs["turns"]).filter(pl.col("role") == "assistant").height
    assert pl.from_arrow(logs["conversations"])["model_version"].unique().to_list() == [MODEL_VERSION]
    assert "truncated" not in quality.reasons
    assert quality.out_of_scope == {"truncated": answers}  # every answer is a person's
    assert f"out of scope: truncated {answers}" in report.summary()

    # The same texts written by a model: answers without an ending are cut-off output.
    _, as_model = run_filters(_by_model(logs, "engine:tiny"), FilterConfig())
    assert as_model["quality"].reasons["truncated"] > 0 and as_model["quality"].out_of_scope == {"truncated": 0}

    # Scopes are a recipe setting: every rule on everyone is the old behaviour.
    config = FilterConfig()
    config.quality.applies_to.truncated = "all"
    _, everyone = run_filters(logs, config)
    assert everyone["quality"].reasons["truncated"] == as_model["quality"].reasons["truncated"]
    assert everyone["quality"].out_of_scope == {}


def test_quality_scope_is_validated():
    from alignloop.data.config import LogsRecipe
    from alignloop.recipes import load_recipe

    with pytest.raises(AlignloopError, match="applies_to"):
        load_recipe(ROOT / "recipes" / "logs.toml", LogsRecipe, ['filter.quality.applies_to.truncated="bots"'])
    with pytest.raises(AlignloopError, match="applies_to"):
        load_recipe(ROOT / "recipes" / "logs.toml", LogsRecipe, ['filter.quality.applies_to.truncate="model"'])


def test_build_says_why_in_one_line(filtered, tmp_path):
    out, _ = filtered
    report = build_datasets(out, BuildConfig(), tmp_path)
    assert report.datasets["dpo"]["rows"] == 0 and report.datasets["sft"]["rows"] > 0
    lines = {n["dataset"]: n["line"] for n in report.notes}
    assert lines["sft"] == SFT_LINE
    assert lines["dpo"] == DPO_LINE
    assert lines["rm/preference"] == PREFERENCE_LINE
    safety = sum(report.datasets[f"rm/safety/{s}"]["rows"] for s in ("train", "eval"))
    assert lines["rm/safety"] == (f"rm/safety: label constant 0 over {safety:,} rows — no safety flags in these "
                                  "logs (no report event); the safety head will not train")
    assert all("\n" not in line for line in lines.values())
    assert json.loads(json.dumps(report.to_dict()))["notes"] == report.notes
    sft = pl.read_parquet(tmp_path / "sft.parquet")
    assert (sft["source"] == "selected").all()

    # Asked for swipes by name: nothing to train on, and the line says what to set instead.
    config = BuildConfig()
    config.sft.source = "swipes"
    named = build_datasets(out, config, tmp_path / "swipes")
    assert named.datasets["sft"]["rows"] == 0
    assert named.lines(["empty"])[0] == (
        'sft: 0 examples — build.sft.source = "swipes" but these logs have no swipes (no select event); '
        '"auto" or "selected" takes every selected answer; SFT needs target answers')


def test_auto_takes_swipes_when_the_logs_have_them(small_world):
    logs, _ = small_world
    datasets, skipped = build_partition(run_filters(logs, FilterConfig())[0], BuildConfig())
    assert (datasets["sft"]["source"] == "swipe").all() and datasets["sft"].height > 0
    assert datasets["dpo"].height > 0 and skipped["logs:select_events"] > 0


def test_build_stage_prints_and_keeps_the_lines(logs, tmp_path, capsys):
    from alignloop.data.config import LogsRecipe
    from alignloop.data.io import write_logs
    from alignloop.data.stage import run_build_stage, run_filter_stage

    write_logs(tmp_path / "people", logs)
    recipe = LogsRecipe.model_validate({"run": {"name": "people", "dir": str(tmp_path / "runs")},
                                        "filter": {"source": str(tmp_path / "people")}})
    funnel = json.loads((run_filter_stage(recipe).dir / "funnel.json").read_text())
    quality = next(f for f in funnel["filters"] if f["name"] == "quality")
    assert quality["out_of_scope"]["truncated"] == quality["input"]
    capsys.readouterr()
    stage = run_build_stage(recipe)
    printed = capsys.readouterr().err.splitlines()
    for line in (SFT_LINE, DPO_LINE, PREFERENCE_LINE):
        assert line in printed  # whole, on one line
    notes = json.loads((stage.dir / "build_report.json").read_text())["notes"]
    assert {n["line"] for n in notes} >= {SFT_LINE, DPO_LINE}
    assert json.loads((stage.dir / "manifest.json").read_text())["notes"] == notes
    run_build_stage(recipe)  # up to date: skipped, and says the lines again
    assert DPO_LINE in capsys.readouterr().err.splitlines()


def test_rl_prompts_split_like_the_reward_models(filtered, tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.rl.config import RLRecipe
    from alignloop.rl.reward_env import read_prompts

    out, _ = filtered
    config = BuildConfig(formats=["parquet"])
    config.rm.eval_fraction = 0.25
    config.rl.max_context_messages = 3
    report = build_datasets(out, config, tmp_path)
    train, held = (pl.read_ndjson(tmp_path / "rl" / f"{s}.jsonl") for s in ("train", "eval"))
    assert (tmp_path / "rl" / "train.parquet").is_file()  # JSONL whatever the formats, Parquet as asked
    assert pl.read_parquet(tmp_path / "rl" / "train.parquet")["example_id"].to_list() == train["example_id"].to_list()
    assert train.height == report.datasets["rl/train"]["rows"] > 0
    assert held.height == report.datasets["rl/eval"]["rows"] > 0
    both = pl.concat([train, held])
    assert both["example_id"].is_unique().all() and both["example_id"].str.starts_with("rl:").all()
    for messages in both["messages"].to_list():
        assert messages[-1]["role"] == "user"
        body = [m for m in messages if m["role"] != "system"]
        assert len(body) <= 3 and body[0]["role"] == "user"
    # The reward models' split: every user on one side, the same side as in rm/*.
    assert not set(train["user_id"]) & set(held["user_id"])
    assert (split_of(train["user_id"], 0.25, "rm-split") == "train").all()
    assert (split_of(held["user_id"], 0.25, "rm-split") == "eval").all()
    rm_eval = set(pl.read_parquet(tmp_path / "rm" / "continue" / "eval.parquet")["user_id"])
    assert not rm_eval & set(train["user_id"])
    # Deduplicated over both splits: a prompt text is in one of them only.
    key = lambda df: {json.dumps(m, sort_keys=True) for m in df["messages"].to_list()}  # noqa: E731
    assert not key(train) & key(held) and len(key(both)) == both.height

    # The RL stage reads the built file as it is.
    path = tmp_path / "rl" / "train.jsonl"
    assert len(read_prompts(path)) == train.height
    recipe = load_recipe(ROOT / "recipes" / "grpo_logs_tiny.toml", RLRecipe,
                         [f"env.prompts={path}", "env.reward=alignloop.rl.reward_env:length_reward"])
    env = recipe.env.build()
    assert len(env.prompts) == train.height and all(p[-1]["role"] == "user" for p in env.prompts)


def test_flywheel_stops_before_training_on_nothing(logs, tmp_path):
    from alignloop.data.io import write_logs
    from alignloop.data.stage import run_build_stage, run_filter_stage
    from alignloop.flywheel.config import FlywheelRecipe
    from alignloop.flywheel.stages import Turn, _logs_recipe, reward_models, sft
    from alignloop.recipes import load_recipe

    write_logs(tmp_path / "people", logs)
    recipe = load_recipe(ROOT / "recipes" / "smoke.toml", FlywheelRecipe, [
        f"run.dir={tmp_path / 'runs'}", f"filter.source={tmp_path / 'people'}", "build.rm.eval_fraction=0.3",
        'rm.heads=["preference", "continue", "safety"]', 'rm.combine.weights={"preference" = 1.0, "continue" = 1.0}',
        'rm.combine.kpi="continue"'])
    turn = Turn(recipe, "people", 1, deployed="tiny", model="tiny")
    run_filter_stage(_logs_recipe(turn))
    build = run_build_stage(_logs_recipe(turn))
    rows = json.loads((build.dir / "build_report.json").read_text())["datasets"]
    safety = rows["rm/safety/train"]["rows"] + rows["rm/safety/eval"]["rows"]
    with pytest.raises(AlignloopError) as stopped:
        reward_models(turn, force=False)
    assert str(stopped.value) == (
        f"turn 1 rm: {PREFERENCE_LINE}; rm/safety: label constant 0 over {safety:,} rows — no safety flags in "
        "these logs (no report event); the safety head will not train (leave those heads out of rm.heads to "
        'train the others; without "safety", also set rm.combine.safety = "none")')
    assert not turn.dir("rm").exists()  # said before training

    swipes = Turn(load_recipe(ROOT / "recipes" / "smoke.toml", FlywheelRecipe, [
        f"run.dir={tmp_path / 'runs'}", f"filter.source={tmp_path / 'people'}", "build.sft.source=swipes"]),
        "people", 1, deployed="tiny", model="tiny")
    run_build_stage(_logs_recipe(swipes), force=True)
    with pytest.raises(AlignloopError, match=r'^turn 1 sft: sft: 0 examples — build.sft.source = "swipes" but '
                                             r"these logs have no swipes \(no select event\)"):
        sft(swipes, force=False)
    assert not swipes.dir("sft").exists()
