"""The agent environment in the RL loop: the recipe section, the adapter (local and remote alike),
the paired before/after test, and a one-step GRPO run on the tiny model end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from alignloop.agentenv.client import RemoteEpisodes
from alignloop.agentenv.sandbox import bwrap_problem
from alignloop.agentenv.server import create_app
from alignloop.errors import AlignloopError
from alignloop.recipes import load_recipe
from alignloop.rl.agent_env import (
    AgentEnv,
    AgentEnvSection,
    paired_change,
    run_agent_rl,
)
from alignloop.rl.config import RLRecipe

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")


def test_the_recipe_section_is_in_the_union_and_strict(tmp_path):
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "grpo_agent.toml", RLRecipe)
    assert isinstance(recipe.env, AgentEnvSection) and recipe.env.difficulty == "guided"
    bad = tmp_path / "bad.toml"
    bad.write_text('[env]\nkind = "agent"\ndifficulty = "easy"\nmax_tool_call = 2\n')
    with pytest.raises(AlignloopError, match="max_tool_call"):
        load_recipe(bad, RLRecipe)
    bad.write_text('[env]\nkind = "agents"\n')
    with pytest.raises(AlignloopError, match="'tool' or 'agent'"):
        load_recipe(bad, RLRecipe)


def test_paired_change_is_exact_for_few_tasks():
    same = paired_change([0, 1, 0.5], [0, 1, 0.5])
    assert same.diff == 0 and same.p_value == 1.0
    up = paired_change([0.0] * 6, [1.0] * 6)
    assert up.better == 6 and up.p_value == pytest.approx(2 / 64)
    many = paired_change([0.0] * 30, [1.0] * 30)
    assert many.p_value < 1e-3 and "p = " in many.line()


@needs_bwrap
def test_local_and_remote_environments_answer_the_rl_loop_alike():
    section = AgentEnvSection(difficulty="trivial", max_turns=2, eval_tasks=2)
    local = section.build()
    tasks = local.sample_tasks(3, seed=5)
    assert [t.id for t in tasks] == [t.id for t in local.sample_tasks(3, seed=5)]
    assert local.heldout_tasks()[0].id.startswith("trivial-heldout")
    want = tasks[0].failing[0].split("expected ")[1]
    fix = ('<tool_call>{"name": "write_file", "arguments": {"path": "solution.py", "content": '
           + json.dumps(f"def answer():\n    return {want}\n") + "}}</tool_call>")
    actions = [[fix, "I cannot.", '<tool_call>{"name": "run_tests", "arguments": {}}</tool_call>'],
               ["Done.", None, "Done."]]
    steps = {}
    with TestClient(create_app()) as http:
        remote = object.__new__(AgentEnv)  # the adapter on a server reached through the test client
        remote.section = section
        remote.episodes = RemoteEpisodes("http://testserver", max_turns=2, client=http)
        for name, env in (("local", local), ("remote", remote)):
            env.reset(tasks)
            steps[name] = [env.step(a) for a in actions]
            env.close()
    for a, b in zip(steps["local"], steps["remote"]):
        assert np.array_equal(a.rewards, b.rewards) and np.array_equal(a.done, b.done)
    first, second = steps["local"]
    assert first.done.tolist() == [False, True, False] and second.rewards.tolist() == [1.0, 0.0, 0.0]


@needs_bwrap
def test_grpo_on_the_agent_env_runs_end_to_end_with_a_held_out_comparison(tmp_path, one_thread):
    recipe = RLRecipe.model_validate({
        "run": {"name": "agent", "dir": str(tmp_path)}, "model": {"name": "tiny"},
        "env": {"kind": "agent", "difficulty": "guided", "max_turns": 2, "eval_tasks": 2, "code_blocks": True,
                "tools": ["write_file", "run_tests"]},
        "sampling": {"max_tokens": 8},
        "rl": {"prompts_per_step": 2, "group": 2, "steps": 1, "lr": 1e-3, "micro_batch": 4, "save_every": 1,
               "samples_per_step": 1, "max_context": 1024, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}})
    lines = []
    change, stage = run_agent_rl(recipe, say=lines.append)
    assert change.n == 2 and 0 <= change.p_value <= 1
    metrics = [json.loads(x) for x in stage.path("metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 1 and "pass_rate" in metrics[0] and "tool_calls" in metrics[0]
    saved = json.loads((stage.dir / "heldout.json").read_text())
    assert len(saved["before_per_task"]) == len(saved["after_per_task"]) == 2
    assert lines[0].startswith("agent env: held-out pass rate before RL") and "p = " in lines[-1]
