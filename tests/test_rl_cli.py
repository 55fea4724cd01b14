"""`alignloop rl ...` on the command line: runs, resumes as up to date, and refuses mismatches."""

import json

from typer.testing import CliRunner

from alignloop.cli import app


def test_rl_grpo_cli_runs_then_is_up_to_date(tmp_path):
    runner = CliRunner()
    args = ["rl", "grpo", "recipes/grpo_tiny.toml", "--set", f"run.dir={tmp_path}", "--set", "rl.steps=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    stage = tmp_path / "grpo-tiny" / "rl-grpo"
    lines = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(x["trained_sequences"] > 0 for x in lines)  # the resume below proves something only if it trains
    evals = [json.loads(x) for x in (stage / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and "eval_correct" in evals[0]
    # before vs after on the same held-out problems, paired, printed and saved
    change = json.loads((stage / "accuracy_change.json").read_text())
    assert change["n"] == 8 and change["before"] == evals[0]["eval_correct"] and change["after"] == evals[1]["eval_correct"]
    assert "greedy accuracy" in result.output and "McNemar p" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "up to date" in again.output
    # --force resumes at the last checkpoint and redoes only the final eval; another config starts
    # afresh, and no stale 'before' record survives to be compared with
    for extra in (["--force"], ["--set", "rl.lr=1e-4"]):
        rerun = runner.invoke(app, [*args, *extra])
        assert rerun.exit_code == 0, rerun.output
        evals = [json.loads(x) for x in (stage / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [0, 2]


def test_rl_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    wrong = runner.invoke(app, ["rl", "grpo", "recipes/grpo_tiny.toml", "--set", "rl.algorithm=ppo"])
    assert isinstance(wrong.exception, Exception) and "rl ppo" in str(wrong.exception)
    typo = runner.invoke(app, ["rl", "grpo", "recipes/grpo_tiny.toml", "--set", "rl.gruop=4"])
    assert "unknown key 'rl.gruop'" in str(typo.exception)
    bad = runner.invoke(app, ["rl", "grpo", "recipes/grpo_tiny.toml", "--backend", "mpi"])
    assert "expected 'local' or 'ray'" in str(bad.exception)


def test_rl_cli_tool_env_and_toy_reward_recipes_run(tmp_path):
    """[env] kind = "tool" and kind = "reward_model" with a RewardFn factory, from the command line."""
    runner = CliRunner()
    tool = runner.invoke(app, ["rl", "grpo", "recipes/grpo_tool_tiny.toml", "--set", f"run.dir={tmp_path}",
                               "--set", "rl.steps=1"])
    assert tool.exit_code == 0, tool.output
    rm = runner.invoke(app, ["rl", "grpo", "recipes/grpo_rm_tiny.toml", "--set", f"run.dir={tmp_path}",
                             "--set", "rl.steps=2", "--set", "env.reward=alignloop.rl.reward_env:length_reward"])
    assert rm.exit_code == 0, rm.output
    stage = tmp_path / "grpo-rm-tiny" / "rl-grpo"
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert all("gt/engagement" in r for r in rows)  # held-out users' true engagement, logged
    assert "hacking" in json.loads((stage / "reward_hacking.json").read_text())


def test_env_reward_accepts_an_rm_train_folder(tmp_path, monkeypatch):
    """env.reward = a run folder (or its rm/ folder) loads the trained reward model's combined RewardFn."""
    import alignloop.rewards.serve as serve
    from alignloop.rl.reward_env import load_reward

    calls = []
    monkeypatch.setattr(serve, "load_reward_fn", lambda path: calls.append(path) or "reward-fn")
    (tmp_path / "rm").mkdir()
    assert load_reward(str(tmp_path)) == "reward-fn" and load_reward(str(tmp_path / "rm")) == "reward-fn"
    assert calls == [tmp_path / "rm", tmp_path / "rm"]


def test_a_changed_starting_model_reruns_rl(tmp_path):
    """The flywheel retrains SFT into the same folder; RL from it must not be found up to date."""
    import torch

    from alignloop.models import load_model

    model, tokenizer = load_model("tiny", dtype="float32", seed=0)
    folder = tmp_path / "start"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runner = CliRunner()
    args = ["rl", "grpo", "recipes/grpo_tiny.toml", "--set", f"run.dir={tmp_path}", "--set", "rl.steps=1",
            "--set", f"model.name={folder}"]
    assert runner.invoke(app, args).exit_code == 0
    assert "up to date" in runner.invoke(app, args).output
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(folder)  # a new SFT model in the same place
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0, rerun.output
    assert "up to date" not in rerun.output
