"""`--backend ray`: Inference and the Environment as Ray actors give the local backend's run."""

import json
from pathlib import Path

import pytest
from test_rl_safety_hacking import PROMPTS, UnsafeCombined, recipe

from alignloop.rl.reward_env import LengthReward, RewardModelEnv
from alignloop.rl.stage import run_rl

pytest.importorskip("ray")

SAME = ("reward", "reward_std", "response_tokens", "loss", "grad_norm", "policy_version", "safety/lambda")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    # Workers import the stand-in rewards of these tests by module name.
    tests = str(Path(__file__).parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield
    ray.shutdown()


def _rows(stage):
    return [json.loads(x) for x in stage.path("metrics.jsonl").read_text().splitlines()]


def test_ray_backend_matches_local(tmp_path, local_ray):
    runs = {}
    for backend in ("local", "ray"):
        runs[backend] = _rows(run_rl(recipe(tmp_path / backend, steps=2, save_every=2),
                                     env=RewardModelEnv(UnsafeCombined(p_unsafe=0.3), PROMPTS), backend=backend))
    assert len(runs["ray"]) == 2
    for a, b in zip(runs["local"], runs["ray"]):
        assert {k: round(a[k], 5) for k in SAME} == {k: round(b[k], 5) for k in SAME}
    assert runs["ray"][1]["safety/lambda"] > 0  # the multiplier lives with the reward, in the env actor


def test_ray_backend_async(tmp_path, local_ray):
    rows = _rows(run_rl(recipe(tmp_path, steps=2, save_every=2, mode="async", max_staleness=1),
                        env=RewardModelEnv(LengthReward(), PROMPTS), backend="ray"))
    assert [r["step"] for r in rows] == [1, 2] and max(r["staleness"] for r in rows) <= 1


def test_ray_backend_trains_in_an_actor_not_in_the_driver(tmp_path, local_ray, monkeypatch):
    import alignloop.rl.backend as rl_backend

    def no_local_trainer(*args, **kwargs):
        raise AssertionError("--backend ray built a trainer in the driver")

    monkeypatch.setattr(rl_backend, "TrainerRole", no_local_trainer)
    stage = run_rl(recipe(tmp_path, steps=2, save_every=1), env=RewardModelEnv(LengthReward(), PROMPTS), backend="ray")
    assert (stage.path("model") / "config.json").is_file()          # saved by the trainer actor
    assert len(list(stage.path("checkpoints").glob("*"))) >= 1      # so were the checkpoints
