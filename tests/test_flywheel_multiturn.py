"""The flywheel's multi-turn RL option (simulated users write, a learned-style reward pays, ground truth only
watches) and the report's turn-over-turn view."""

import json
from pathlib import Path

import numpy as np
import pytest

from alignloop.errors import AlignloopError
from alignloop.flywheel import stages as fw_stages
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.recipes import load_recipe
from alignloop.rewards.api import RewardBatch
from alignloop.rl.reward_env import RewardModelEnvSection
from alignloop.rl.user_env import UserSimEnvSection

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.toml"


class StayReward:
    """Stands in for the turn's reward models: reward = reply length, raw p(continue) 1 (users always stay)."""

    def __call__(self, contexts, responses):
        n = len(responses)
        return RewardBatch(np.array([len(r) / 100 for r in responses]), {"raw/continue": np.ones(n)})


def stay_reward() -> StayReward:
    return StayReward()


def _recipe(tmp_path, *overrides):
    return load_recipe(SMOKE, FlywheelRecipe, [f"run.dir={tmp_path}", *overrides])


def test_single_turn_stays_the_default_and_multi_turn_uses_the_turns_reward_models(tmp_path):
    single = _recipe(tmp_path)
    assert single.rl.env == "single_turn"
    env, _, prompts = fw_stages._rl_env(single.rl, "runs/x/turn-1/rm")
    assert isinstance(env, RewardModelEnvSection) and env.reward == "runs/x/turn-1/rm" and prompts

    multi = _recipe(tmp_path, 'rl.env="multi_turn"', "rl.max_turns=2")
    env, truth, prompts = fw_stages._rl_env(multi.rl, "runs/x/turn-1/rm")
    # The learned reward pays; the users' seed is RL's own (nobody evaluates on them); truth is a scorer for the watch.
    assert isinstance(env, UserSimEnvSection) and env.reward == "runs/x/turn-1/rm"
    assert (env.max_turns, env.users, env.users_seed) == (2, multi.rl.users, multi.rl.users_seed)
    assert env.stay_component == "continue" and prompts is None and callable(truth)


def test_multi_turn_needs_the_continue_head_and_simulated_users(tmp_path):
    with pytest.raises(AlignloopError, match="continue"):
        _recipe(tmp_path, 'rl.env="multi_turn"', 'rm.heads=["preference", "thumbs", "returned_1d", "safety"]',
                "rm.combine.weights={preference=1.0}")
    with pytest.raises(AlignloopError, match="rl.env"):
        _recipe(tmp_path, 'rl.env="bogus"')


def test_multi_turn_rl_stage_trains_on_conversations_and_watches_ground_truth(tmp_path):
    recipe = _recipe(tmp_path, 'rl.env="multi_turn"', "rl.max_turns=2", "rl.reward=test_flywheel_multiturn:stay_reward")
    turn = fw_stages.Turn(recipe, "fw", 1, deployed="tiny", model="tiny")
    summary = fw_stages.rl(turn, False)
    assert summary["env"] == "multi_turn" and summary["model"].endswith("turn-1/rl-grpo/model")
    steps = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    assert len(steps) == recipe.rl.rl.steps and all(np.isfinite(s["gt/engagement"]) for s in steps)
    samples = [json.loads(x) for x in (tmp_path / "fw/turn-1/rl-grpo/samples.jsonl").read_text().splitlines()]
    for s in samples:
        bot = [m for m in s["messages"] if m["role"] == "assistant"]
        users = [m for m in s["messages"] if m["role"] == "user"]
        # Users always stay here: two bot turns, the simulated user's second message between them.
        assert len(bot) == 2 and len(users) == 2
        # The episode's reward is the reward's (length) summed over its turns, not the ground truth.
        assert s["reward"] == pytest.approx(sum(len(m["content"]) / 100 for m in bot))
    assert "hacking" in summary["reward_hacking"]


def _comparison(control, treatment, p):
    diff = treatment - control
    return {"control": control, "treatment": treatment, "diff": diff, "ci_low": diff - 0.05, "ci_high": diff + 0.05,
            "p_value": p}


def _turn(n, deployed, new, launch):
    truth = {"metric": "gt_engagement", "diff": new - deployed, "ci_low": 0.0, "ci_high": 1.0, "p_value": 0.01,
             "truth_better": True, "kpis_better": launch, "agrees": launch}
    comparisons = {"continue_rate": _comparison(0.3, 0.3 + 0.05 * launch, 0.01 if launch else 0.4),
                   "turns_per_session": _comparison(1.5, 1.6, 0.07), "return_1d": _comparison(0.2, 0.25, 0.3)}
    ci = {"mean": new, "lo": new - 0.1, "hi": new + 0.1, "n": 48}
    evaluation = {"prompts": 48, "users": 48, "deployed": {"gt_engagement": deployed, "gt_quality": 0.0, "rules": {}},
                  "new": {"gt_engagement": new, "gt_engagement_ci": ci, "gt_quality": 0.0, "rules": {}}}
    ab = {"comparisons": comparisons, "ground_truth": truth, "exposed": {}, "srm_p_value": 1.0, "unsafe_rate": {},
          "power": None, "decision": {"launch": launch, "reasons": [], "primary": "continue_rate"}}
    return {"turn": n, "deployed": f"m{n - 1}", "model": f"m{n}", "launched": launch, "why": ["A/B: ..."],
            "summaries": {"eval": evaluation, "abtest": ab}}


def test_report_charts_ground_truth_per_turn_beside_each_ab_decision(tmp_path):
    from alignloop.flywheel import compound
    from alignloop.flywheel.report import write_report

    turns = [_turn(1, -0.3, 0.5, True), _turn(2, 0.5, 0.4, False), _turn(3, 0.5, 0.7, True)]
    state = {"run": "fw3", "stages": ["eval", "abtest"], "turns": turns, "deployed_at_end": "m3", "not_run": {},
             "timings": [{"turn": t, "stage": "eval", "seconds": 60.0} for t in (1, 2, 3)]}
    points = compound.ground_truth_points(state)
    assert [p["turn"] for p in points] == [0, 1, 2, 3] and points[0]["gt"] == -0.3 and points[0]["lo"] is None
    # A refused turn leaves the deployed model's ground truth where it was.
    assert compound.deployed_path(points) == [-0.3, 0.5, 0.5, 0.7]
    lines = compound.turn_lines(state)
    assert "turn 2: A/B DO NOT LAUNCH on continue_rate +0.0000" in "\n".join(lines)
    assert any(line.startswith("turn 3: multi-turn turns_per_session 1.500 -> 1.600") for line in lines)
    assert "turn 1: ground truth +0.500 [+0.400, +0.600] on 48 held-out users (launched)" in lines

    write_report(state, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert (tmp_path / "ground_truth_turns.png").stat().st_size > 0 and "Across turns" in page
    assert "Multi-turn metrics" in page and "DO NOT LAUNCH" in page and 'alt="ground_truth_turns.png"' in page


def test_offline_eval_gives_each_models_ground_truth_an_interval_over_users():
    from alignloop.eval.heldout import UsersSection, heldout_prompts
    from alignloop.eval.offline import _scores

    prompts = heldout_prompts(UsersSection(seed=1000, users=6, prompts_per_user=2))
    summary, engagement = _scores(["Sure! What do you like about it?"] * len(prompts), prompts)
    ci = summary["gt_engagement_ci"]
    # Over users, not prompts: 6 users' means, whose mean is the prompts' mean (2 prompts each).
    assert ci["n"] == 6 and ci["lo"] < summary["gt_engagement"] < ci["hi"]
    assert ci["mean"] == pytest.approx(summary["gt_engagement"])
