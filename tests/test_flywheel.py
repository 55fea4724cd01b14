"""The whole loop on the smoke recipe: every stage runs, a crash resumes where it was, the report is written."""

import json
from pathlib import Path

import pytest

from alignloop.errors import AlignloopError
from alignloop.flywheel import stages as fw_stages
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.report import where_is
from alignloop.flywheel.stage import launch_decision, planned_stages, run_flywheel
from alignloop.recipes import load_recipe

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.toml"


def _recipe(tmp_path, *overrides):
    return load_recipe(SMOKE, FlywheelRecipe, [f"run.dir={tmp_path}", *overrides])


def _mtimes(folder: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in folder.glob("turn-1/*/manifest.json")}


def test_flywheel_smoke_runs_resumes_after_a_crash_and_reports(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    stages = planned_stages(recipe)
    assert stages == ["simulate", "filter", "build", "sft", "rm", "rl", "eval", "abtest"]

    # First attempt dies in the middle of the evaluation stage (after SFT, reward models and RL finished).
    real_eval = fw_stages.TURN_STAGES["eval"]

    def crash(turn, force):
        raise KeyboardInterrupt("killed during eval")

    monkeypatch.setitem(fw_stages.TURN_STAGES, "eval", crash)
    with pytest.raises(KeyboardInterrupt):
        run_flywheel(recipe, run="fw")
    folder = tmp_path / "fw"
    done_before = _mtimes(folder)
    finished = ["simulate", "filter", "build", "sft", "rm", "rl-grpo", "rm-eval"]
    assert set(done_before) == set(finished)
    assert not (folder / "flywheel.json").exists()
    assert sorted(r["stage"] for r in where_is(folder) if r["done"]) == sorted(finished)

    # Same command again: the finished stages are skipped (manifests untouched), the rest runs.
    monkeypatch.setitem(fw_stages.TURN_STAGES, "eval", real_eval)
    state = run_flywheel(recipe, run="fw")
    after = _mtimes(folder)
    assert {k: after[k] for k in done_before} == done_before
    assert {"eval", "abtest"} <= set(after)

    turn = state["turns"][0]
    assert turn["model"].endswith("turn-1/rl-grpo/model")
    rl_steps = [json.loads(x) for x in Path(turn["summaries"]["rl"]["metrics"]).read_text().splitlines()]
    assert rl_steps and all(r["trained_sequences"] > 0 for r in rl_steps)  # the smoke RL trains
    assert "reward_hacking" in turn["summaries"]["rl"] and turn["summaries"]["rm"]["lines"]
    e = turn["summaries"]["eval"]
    assert e["prompts"] == 16 and set(e["new"]) >= {"gt_engagement", "rules"}
    a = turn["summaries"]["abtest"]
    assert set(a["comparisons"]) >= {"gt_engagement", "continue_rate", "unsafe_rate"}
    assert turn["launched"] == (a["decision"]["launch"] and not turn["summaries"]["rl"]["reward_hacking"]["hacking"])
    assert turn["why"][0].startswith("A/B: ")
    page = (folder / "report.html").read_text()
    assert "Decision:" in page and "data:image/png;base64," in page and "Stage timings" in page
    saved = json.loads((folder / "flywheel.json").read_text())
    assert [t["stage"] for t in saved["timings"]] == [*stages, "report"]

    # --from re-runs that stage and later ones only.
    before = _mtimes(folder)
    run_flywheel(recipe, run="fw", from_stage="abtest")
    again = _mtimes(folder)
    assert again["abtest"] != before["abtest"]
    assert all(again[k] == before[k] for k in before if k != "abtest")


def test_flywheel_recipe_errors_are_clear(tmp_path):
    with pytest.raises(AlignloopError, match="abtest.world.seed"):
        _recipe(tmp_path, "abtest.world.seed=0")
    with pytest.raises(AlignloopError, match="flywheel.bogus"):
        _recipe(tmp_path, "flywheel.bogus=1")
    with pytest.raises(AlignloopError, match="--from"):
        run_flywheel(_recipe(tmp_path), run="x", from_stage="nope")

    with pytest.raises(AlignloopError, match="rm.combine.weights name component"):
        _recipe(tmp_path, 'rm.heads=["preference", "safety"]')
    hacked = _recipe(tmp_path, "rl.reward=alignloop.rl.reward_env:length_reward")
    assert hacked.rl.reward.endswith(":length_reward")


def test_launch_needs_the_ab_win_and_no_reward_hacking():
    win = {"abtest": {"decision": {"launch": True, "reasons": ["gt_engagement up"]}}}
    assert launch_decision(win) == (True, ["A/B: launch (gt_engagement up)"])
    hacked = {**win, "rl": {"reward_hacking": {"hacking": True}}}
    launch, why = launch_decision(hacked)
    assert not launch and "reward hacking" in why[1]
    assert launch_decision({"abtest": {"decision": {"launch": False}}})[0] is False


def test_quickstart_and_hacked_recipes_load_and_differ_only_in_the_reward_and_room():
    root = SMOKE.parent
    quick = load_recipe(root / "quickstart.toml", FlywheelRecipe)
    hacked = load_recipe(root / "hacked.toml", FlywheelRecipe)
    assert quick.flywheel.base_model == "smollm2-135m" and quick.rl.reward == "learned"
    assert hacked.rl.reward == "alignloop.rl.reward_env:length_reward"
    same = {k for k in ("world", "filter", "build", "sft", "rm") if getattr(quick, k) == getattr(hacked, k)}
    assert same == {"world", "filter", "build", "sft", "rm"}
    assert quick.abtest.world.seed != quick.world.seed
