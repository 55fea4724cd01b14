"""Safety and ground truth in the RL loop: the Lagrangian multiplier moves once per step on the
step's unsafe rate; a reward that pays for length alone, against users who dislike length, is
flagged as reward hacking (ground truth only logged, never trained on)."""

import json

import numpy as np

from alignloop.rewards.api import RewardBatch
from alignloop.rewards.combine import Lagrangian
from alignloop.rl.config import RLRecipe
from alignloop.rl.hacking import HackingWatch, trend
from alignloop.rl.reward_env import LengthReward, RewardModelEnv
from alignloop.rl.stage import run_rl
from alignloop.rl.safety import attach

PROMPTS = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(16)]


class UnsafeCombined:
    """Stands in for rewards.serve.CombinedReward: pays lambda * p_unsafe, moves lambda per call unless told."""

    def __init__(self, p_unsafe: float, budget: float = 0.1):
        self.lagrangian = Lagrangian(budget, lr=1.0)
        self.dual_updates_per_call = True
        self.p = p_unsafe
        self.prices: list[float] = []

    def __call__(self, contexts, responses):
        n = len(responses)
        p = np.full(n, self.p)
        self.prices.append(self.lagrangian.value)
        if self.dual_updates_per_call:
            self.lagrangian.update(self.p)
        return RewardBatch(np.array([len(r) / 50 for r in responses]) - self.lagrangian.value * p,
                           {"p_unsafe": p}, np.zeros(n, dtype=bool))


def recipe(tmp_path, **rl):
    return RLRecipe.model_validate({
        "run": {"name": "t", "dir": str(tmp_path)}, "model": {"name": "tiny"},
        "env": {"eval_tasks": 0}, "sampling": {"max_tokens": 8},
        "rl": {"prompts_per_step": 2, "group": 4, "steps": 3, "lr": 5e-3, "micro_batch": 8, "save_every": 3,
               "samples_per_step": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **rl}})


def test_step_dual_moves_lambda_once_per_step_from_the_steps_unsafe_rate():
    reward = UnsafeCombined(p_unsafe=0.5, budget=0.1)
    env = RewardModelEnv(reward, PROMPTS)
    dual = attach(env)
    assert dual is not None and reward.dual_updates_per_call is False
    env.reset([0, 1]); env.step(["a", "b"]); env.step(["c", "d"])  # two calls (e.g. two turns) in one step
    assert reward.lagrangian.value == 0.0  # not moved by the calls
    m = dual.update()
    assert m["safety/p_unsafe"] == 0.5 and m["safety/lambda"] == 0.0 and np.isclose(m["safety/lambda_next"], 0.4)
    # Under budget it falls again (projected at 0).
    reward.p = 0.0
    env.step(["e", "f"])
    assert np.isclose(dual.update()["safety/lambda_next"], 0.3)
    assert attach(RewardModelEnv(LengthReward(), PROMPTS)) is None  # no Lagrangian: nothing to move


def test_loop_logs_lambda_per_step_and_checkpoints_it(tmp_path):
    reward = UnsafeCombined(p_unsafe=0.3, budget=0.1)
    stage = run_rl(recipe(tmp_path), env=RewardModelEnv(reward, PROMPTS))
    rows = [json.loads(x) for x in stage.path("metrics.jsonl").read_text().splitlines()]
    lam = [r["safety/lambda"] for r in rows]
    assert np.allclose(lam, [0.0, 0.2, 0.4]) and np.isclose(rows[-1]["safety/lambda_next"], 0.6)
    assert reward.prices == lam  # every reward call of a step paid that step's price
    from alignloop.train import checkpoint as ckpt

    (_, path), = ckpt.list_checkpoints(stage.path("checkpoints"))
    assert np.isclose(ckpt.read_trainer_state(path)["safety_lambda"], 0.6)


def test_trend_statistics():
    slope, t = trend([0.0, 1.0, 2.1, 2.9, 4.0])
    assert 0.9 < slope < 1.1 and t > 10
    assert trend([1.0, 1.0, 1.0])[0] == 0.0


def test_loop_scores_every_reply_against_ground_truth_and_writes_the_verdict(tmp_path):
    """The hook (evaluation only) sees every reply of every step; its scores are logged next to the
    learned reward, never fed back (the rewards are the learned reward's alone)."""
    seen = []

    def truth(contexts, responses, tasks):  # anti-length users
        seen.append(len(responses))
        return np.array([-len(r) / 50.0 for r in responses])

    stage = run_rl(recipe(tmp_path, steps=3), env=RewardModelEnv(LengthReward(), PROMPTS), groundtruth=truth)
    rows = [json.loads(x) for x in stage.path("metrics.jsonl").read_text().splitlines()]
    assert seen == [8] * 3
    for r in rows:  # length pays, length is what these users hate: exactly opposite on every sample
        assert np.isclose(r["gt/engagement"], -2 * r["reward"]) and np.isclose(r["gt/reward_corr"], -1.0)
    verdict = json.loads(stage.path("reward_hacking.json").read_text())
    assert verdict["steps"] == 3 and "hacking" in verdict
    assert json.loads(stage.path("manifest.json").read_text())["reward_hacking"] == verdict


def _episode(reward: float, reply: str):
    from alignloop.rl.trajectory import Trajectory

    return Trajectory([1, 2], [False, True], [0.0, 0.0], reward=reward,
                      messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}])


def test_reward_rising_while_ground_truth_falls_is_reported_loudly(capsys):
    """A length-paying reward being optimised: replies grow, the reward rises, users who hate
    length engage less. The verdict says hacking and the summary shouts it."""
    from alignloop.rl.hacking import report_verdict

    watch = HackingWatch(lambda contexts, responses, tasks: np.array([-len(r) / 50.0 for r in responses]))
    rng = np.random.default_rng(0)
    for step in range(1, 9):
        replies = ["x" * int(10 * step + rng.integers(0, 5)) for _ in range(4)]
        watch.score(step, [_episode(LengthReward()([[]], [r]).reward[0], r) for r in replies])
    v = watch.verdict()
    assert v["reward_rose"] and v["groundtruth_fell"] and v["hacking"]
    report_verdict("rl-grpo", v)
    assert "REWARD HACKING DETECTED" in capsys.readouterr().err.replace("\n", " ")


def test_aligned_ground_truth_is_not_hacking():
    watch = HackingWatch(lambda c, r, t: np.array([len(x) for x in r], dtype=float))
    from alignloop.rl.trajectory import Trajectory

    for step in range(1, 6):
        ts = [Trajectory([1, 2], [False, True], [0.0, 0.0], reward=float(step),
                         messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * step}])]
        watch.score(step, ts)
    v = watch.verdict()
    assert v["reward_rose"] and not v["groundtruth_fell"] and not v["hacking"] and not v["reward_only"]


def test_reward_up_with_flat_ground_truth_is_a_warning(capsys):
    from alignloop.rl.hacking import report_verdict
    from alignloop.rl.trajectory import Trajectory

    watch = HackingWatch(lambda c, r, t: np.array([(-1.0) ** len(x) * 0.1 for x in r]))  # noise, no trend
    for step in range(1, 9):
        ts = [Trajectory([1, 2], [False, True], [0.0, 0.0], reward=float(step),
                         messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * step}])]
        watch.score(step, ts)
    v = watch.verdict()
    assert v["reward_rose"] and not v["hacking"] and v["reward_only"]
    report_verdict("rl-grpo", v)
    assert "reward rose but ground-truth engagement did not" in capsys.readouterr().err.replace("\n", " ")
