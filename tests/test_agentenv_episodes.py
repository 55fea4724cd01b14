"""Episodes, tools, the HTTP server and the CLI: a scripted policy plays tiny tasks locally and over
HTTP and gets the same answers; rewards, penalties, parallel calls and the `alignloop env` commands."""

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alignloop.agentenv.client import RemoteEpisodes
from alignloop.agentenv.episodes import Episodes
from alignloop.agentenv.limits import AgentEnvError, SandboxLimits
from alignloop.agentenv.sandbox import bwrap_problem
from alignloop.agentenv.server import create_app
from alignloop.agentenv.tasks import make_task, tiny_suite
from alignloop.agentenv.tools import TOOL_NAMES, system_prompt
from alignloop.cli.env import app as env_app

needs_bwrap = pytest.mark.skipif(bwrap_problem() is not None, reason=f"no sandbox here: {bwrap_problem()}")
LIMITS = SandboxLimits(wall_seconds=5, cpu_seconds=5, memory_mb=256, processes=32, disk_mb=8, tmp_mb=4)


def call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def fix_trivial(task):
    want = task.failing[0].split("expected ")[1]
    return call("write_file", path="solution.py", content=f"def answer():\n    return {want}\n")


def script(tasks):
    """Two turns per task: a fix (or a mess) with parallel calls, then a final word."""
    trivial, _, medium, _ = tasks
    return [
        [fix_trivial(trivial) + call("run_tests") + call("lint"),
         call("grep", pattern="def ") + call("read_file", path="nope/../../etc/passwd"),
         call("search", query=medium.failing[0].split(":")[2].split("(")[0].strip(), k=1),
         call("no_such_tool") + "<tool_call>{not json</tool_call>" + call("run", cmd="ls")],
        ["Done.", "Done.", "Done.", "Done."],
    ]


def play(env, tasks):
    first = env.reset(tasks)
    steps = [env.step(actions) for actions in script(tasks)]
    return first, steps


def test_the_system_prompt_lists_every_tool_in_the_familys_syntax():
    text = system_prompt("qwen2.5")
    assert all(f'"name": "{name}"' in text for name in TOOL_NAMES) and "<tool_call>" in text
    with pytest.raises(AgentEnvError, match="no tool-call syntax"):
        system_prompt("llama-2")


@needs_bwrap
def test_local_episodes_reward_fixes_and_penalise_malformed_calls():
    tasks = tiny_suite()
    with Episodes(limits=LIMITS, max_turns=3) as env:
        first, (one, two) = play(env, tasks)
    assert first[0][0]["role"] == "system" and "answer()" in first[0][1]["content"]
    assert one.done == [False] * 4 and one.rewards == [0.0] * 4
    trivial_turn = one.observations[0]
    results = [json.loads(m["content"]) for m in trivial_turn if m["role"] == "tool"]
    assert [m["name"] for m in trivial_turn if m["role"] == "tool"] == ["write_file", "run_tests", "lint"]
    # the calls of one turn ran at once; their results come back in the order the calls were written
    assert results[0]["written"] > 0 and "passed" in results[1] and "exit_code" in results[2]
    assert "outside the repository" in one.observations[1][-1]["content"]
    search = json.loads(one.observations[2][-1]["content"])["results"][0]
    wanted = tasks[2].failing[0].split(":")[2].split("(")[0].strip()
    assert search["path"].endswith(".py") and f"{wanted}(" in search["text"]
    assert two.done == [True] * 4
    assert two.rewards[0] == 1.0 and two.info[0]["pass_rate"] == 1.0
    hard = make_task("hard", 0)
    assert two.info[3]["malformed"] == 3.0  # unknown tool, unparseable call, wrong argument name
    assert two.rewards[3] == pytest.approx(hard.grade({"passed": [t for t in hard.tests if not any(
        t in f for f in hard.failing)]}) - 0.3)


@needs_bwrap
def test_over_http_the_same_answers_and_snapshot_restore():
    tasks = tiny_suite()
    with Episodes(limits=LIMITS, max_turns=3) as env:
        _, local = play(env, tasks)
    with TestClient(create_app()) as http:
        remote = RemoteEpisodes("http://testserver", limits=LIMITS, max_turns=3, client=http)
        _, over_http = play(remote, tasks)
        assert [s.rewards for s in over_http] == [s.rewards for s in local]
        assert [s.done for s in over_http] == [s.done for s in local]
        remote.reset(tasks[:1])
        remote.call(0, "run", {"command": "export K=v; mkdir d; cd d; echo 1 > f"})
        snap = remote.snapshot(0)
        remote.call(0, "run", {"command": "rm f; cd /; export K=gone"})
        remote.restore(0, snap)
        assert json.loads(remote.call(0, "run", {"command": "pwd; echo $K; cat f"}))["output"] == "/work/d\nv\n1\n"
        with pytest.raises(AgentEnvError, match="no episode 5"):
            remote.snapshot(5)
        remote.close()
        with pytest.raises(AgentEnvError, match="no session"):
            remote.snapshot(0)


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(AgentEnvError, match="unreachable"):
        RemoteEpisodes("http://127.0.0.1:9", timeout=2)


def test_cli_tasks_writes_repositories(tmp_path):
    result = CliRunner().invoke(env_app, ["tasks", "--out", str(tmp_path), "--difficulty", "medium", "--n", "3"])
    assert result.exit_code == 0, result.output
    assert "3 medium tasks" in result.output
    lines = (tmp_path / "tasks.jsonl").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / json.loads(lines[0])["id"] / "tests").is_dir()


@needs_bwrap
def test_cli_bench_prints_the_figures_and_ends_with_json():
    result = CliRunner().invoke(env_app, ["bench", "--starts", "3", "--calls", "3", "--rounds", "1"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for key in ("sandbox_start", "tool_read_file_local", "tool_run_local", "tool_read_file_http", "tool_run_http"):
        assert figures[key]["p50_ms"] > 0 and figures[key]["p99_ms"] >= figures[key]["p50_ms"]
    assert figures["batch"]["serial_ms"] > 0 and figures["batch"]["parallel_ms"] > 0
    assert "sandbox start: p50" in result.output and "parallel" in result.output
