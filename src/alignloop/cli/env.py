"""`alignloop env serve|bench|tasks|rl`: the sandboxed agent environment for tool-use RL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from alignloop.cli.options import ForceOpt, RecipeArg, RunOpt, SetOpt, done, load

app = typer.Typer(help="The agent environment: coding tasks in bubblewrap sandboxes, served over HTTP, "
                  "benchmarked, and trained on.", no_args_is_help=True)


@app.command("serve")
def serve(host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port.")] = 8765,
          max_sessions: Annotated[int, typer.Option(help="Episode batches open at once.")] = 16) -> None:
    """Serve agent environments over HTTP (reset, step, close, snapshot, restore); an RL recipe's
    `[env] url = "http://HOST:PORT"` plays on it."""
    from alignloop.agentenv.sandbox import bwrap_problem
    from alignloop.agentenv.server import serve as run_server
    from alignloop.errors import AlignloopError

    if (problem := bwrap_problem()) is not None:
        raise AlignloopError(f"cannot serve agent environments: {problem}")
    print(f"agent environments on http://{host}:{port}", flush=True)
    run_server(host, port, max_sessions)


@app.command("bench")
def bench(starts: Annotated[int, typer.Option(help="Sandboxes started one after another.")] = 50,
          calls: Annotated[int, typer.Option(help="Calls per tool, locally and over HTTP.")] = 200,
          rounds: Annotated[int, typer.Option(help="Rounds of the parallel-vs-serial batch.")] = 5) -> None:
    """Sandbox start p50/p99, tool-call latency p50/p99 (local and over HTTP), a turn's batch of tool
    calls in parallel vs serially; the last line is one JSON object."""
    import json

    from alignloop.agentenv.bench import run_bench

    print(json.dumps(run_bench(starts, calls, rounds)))


@app.command("tasks")
def tasks(out: Annotated[Path, typer.Option(help="Folder to write the tasks into.")],
          difficulty: Annotated[str, typer.Option(help="trivial, easy, medium or hard.")] = "easy",
          n: Annotated[int, typer.Option(help="How many (from the first).")] = 300,
          split: Annotated[str, typer.Option(help="train or heldout.")] = "train",
          seed: Annotated[int, typer.Option(help="Task-set seed.")] = 0) -> None:
    """Write generated tasks (each a small repository with failing tests) to a folder, plus tasks.jsonl."""
    from alignloop.agentenv.tasks import task_set, write_tasks

    chosen = task_set(difficulty, n, split, seed)
    path = write_tasks(chosen, out)
    tests = sum(len(t.tests) for t in chosen)
    failing = sum(len(t.failing) for t in chosen)
    print(f"{len(chosen)} {difficulty} tasks ({split}, seed {seed}): {tests} tests, {failing} failing at the start")
    print(path)


@app.command("rl")
def rl(recipe: RecipeArg, set_: SetOpt = None, run: RunOpt = None, force: ForceOpt = False) -> None:
    """Held-out pass rate of the recipe's model, GRPO against the agent environment, the same held-out
    tasks again: paired before/after with a p-value (written to the stage's heldout.json)."""
    from alignloop.errors import AlignloopError
    from alignloop.rl.agent_env import AgentEnvSection, run_agent_rl
    from alignloop.rl.config import RLRecipe

    loaded = load(recipe, RLRecipe, set_)
    if not isinstance(loaded.env, AgentEnvSection):
        raise AlignloopError(f"{recipe}: env.kind must be 'agent' for `alignloop env rl`")
    if loaded.env.eval_tasks == 0:
        raise AlignloopError(f"{recipe}: env.eval_tasks = 0: no held-out tasks to compare before and after")
    _, stage = run_agent_rl(loaded, run, force)
    done(stage)
