"""The local RL loop on the tiny model: it learns, syncs weights in place, resumes exactly after a
kill, stops cleanly on a broken reward, and bounds staleness in async mode."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alignloop.errors import AlignloopError
from alignloop.rewards.api import RewardBatch
from alignloop.rl.config import RLRecipe
from alignloop.rl.reward_env import RewardModelEnv
from alignloop.rl.stage import run_rl
from alignloop.train import checkpoint as ckpt

PROMPTS = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(16)]


class LengthReward:
    """Longer replies score higher: varies between samples, so every group has a signal."""

    def __init__(self, fail_at_call: int | None = None, bad: str = "raise"):
        self.calls, self.fail_at_call, self.bad = 0, fail_at_call, bad

    def __call__(self, contexts, responses):
        self.calls += 1
        reward = np.array([len(r) / 50.0 for r in responses])
        if self.fail_at_call is not None and self.calls >= self.fail_at_call:
            if self.bad == "raise":  # stays broken: the wrapper's per-sample retry finds sample 0
                raise RuntimeError("scorer crashed")
            if self.calls == self.fail_at_call and self.bad == "nan":
                reward[3] = np.nan
            elif self.calls == self.fail_at_call and self.bad == "count":
                reward = reward[:-1]
        return RewardBatch(reward)


def recipe(tmp_path, **rl):
    return RLRecipe.model_validate({
        "run": {"name": "t", "dir": str(tmp_path)}, "model": {"name": "tiny"},
        "env": {"eval_tasks": 0}, "sampling": {"max_tokens": 8},
        "rl": {"prompts_per_step": 2, "group": 4, "steps": 4, "lr": 5e-3, "micro_batch": 4, "save_every": 2,
               "samples_per_step": 1, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, **rl}})


def metrics(stage):
    return [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_and_resumes_exactly_after_a_crash(tmp_path):
    full = run_rl(recipe(tmp_path / "a"), env=RewardModelEnv(LengthReward(), PROMPTS))
    m = metrics(full)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert all(r["trained_sequences"] > 0 and r["grad_norm"] > 0 for r in m)
    # Weight sync works: the engine samples from the policy the trainer scores, every step, so
    # their log-probs agree up to numerics (a stale engine would drift as the adapters grow).
    assert max(r["mismatch_abs"] for r in m) < 1e-3
    assert all(r["policy_version"] == r["step"] - 1 and r["staleness"] == 0 for r in m)
    # samples and manifest written
    assert len(full.path("samples.jsonl").read_text().splitlines()) == 4
    assert (full.path("model") / "model.safetensors").exists()

    # The same run, killed by a crashing reward at step 3: a clear error, checkpoint 2 intact.
    crashed = recipe(tmp_path / "b")
    with pytest.raises(AlignloopError, match=r"step 3: reward .* raised.*sample.*last checkpoint"):
        run_rl(crashed, env=RewardModelEnv(LengthReward(fail_at_call=3), PROMPTS))
    stage_dir = tmp_path / "b" / "t" / "rl-grpo"
    assert [s for s, _ in ckpt.list_checkpoints(stage_dir / "checkpoints")] == [2]
    # Started again: resumes at step 2 and ends where the uninterrupted run ended, bit for bit.
    resumed = run_rl(crashed, env=RewardModelEnv(LengthReward(), PROMPTS))
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert [r["reward"] for r in metrics(resumed)] == [r["reward"] for r in m]
    a = load_file(full.path("checkpoints") / "step-000004" / "trainable.safetensors")
    b = load_file(resumed.path("checkpoints") / "step-000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad,message", [("nan", r"nan at sample 3"), ("count", r"7 rewards for 8 samples")])
def test_broken_reward_stops_with_the_sample_named(tmp_path, bad, message):
    with pytest.raises(AlignloopError, match=message):
        run_rl(recipe(tmp_path, steps=3), env=RewardModelEnv(LengthReward(fail_at_call=3, bad=bad), PROMPTS))
    root = tmp_path / "t" / "rl-grpo" / "checkpoints"
    (step, path), = ckpt.list_checkpoints(root)
    assert step == 2 and ckpt.read_trainer_state(path)["step"] == 2


def test_async_rollouts_are_at_most_k_steps_stale(tmp_path):
    stage = run_rl(recipe(tmp_path, mode="async", max_staleness=1, steps=4),
                   env=RewardModelEnv(LengthReward(), PROMPTS))
    m = metrics(stage)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    stale = [r["staleness"] for r in m]
    assert max(stale) <= 1 and stale[0] == 0
    # The rollout of step 2 is generated while step 1 trains, from the initial policy.
    assert stale[1] == 1
    # Stale rollouts differ from the trainer's policy: the mismatch is measured and corrected.
    assert m[1]["mismatch_abs"] > m[0]["mismatch_abs"]
