"""Greedy answers to held-out tasks, before, during and after RL (verifiable environments).

The held-out tasks come from a seed no training step uses. Each eval is a line of eval.jsonl
(the env's metrics averaged, and each task's correctness); at the end the first and the last
are compared task by task (`accuracy_change`: paired, McNemar) into accuracy_change.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from alignloop.engine.api import SamplingParams
from alignloop.rl.arithmetic import AccuracyChange, ArithmeticEnvSection, accuracy_change
from alignloop.rl.backend import Roles
from alignloop.rl.config import RLRecipe
from alignloop.rl.rollout import play
from alignloop.runs import Stage, append_jsonl, atomic_write_json, trim_jsonl
from alignloop.ui import say

EVAL = "eval.jsonl"
ACCURACY = "accuracy_change.json"  # verifiable envs: before vs after, paired
EVAL_SEED = 10_000_019  # held-out tasks: a seed no training step uses


def evaluate(roles: Roles, recipe: RLRecipe) -> tuple[dict[str, float], list[float] | None]:
    """Greedy answers to the held-out tasks: the env's metrics (e.g. correct, formatted) averaged,
    and each task's correctness (for the paired before/after test; None if the env has none)."""
    n = recipe.env.eval_tasks if isinstance(recipe.env, ArithmeticEnvSection) else 0
    if n == 0 or roles.env.name != "arithmetic":
        return {}, None
    tasks = roles.env.sample_tasks(n, seed=EVAL_SEED)
    greedy = SamplingParams(temperature=0.0, max_tokens=recipe.sampling.max_tokens)
    r = play(roles.env, roles.inference, roles.tokenizer, tasks, 1, greedy, seed=EVAL_SEED,
             max_context=recipe.rl.max_context)
    metrics = {"eval_reward": float(np.mean([t.reward for t in r.trajectories])),
               **{f"eval_{k}": v for k, v in r.info.items()}}
    per_task = ([float(t.info["correct"]) for t in r.trajectories]
                if all("correct" in t.info for t in r.trajectories) else None)
    return metrics, per_task


def eval_before(stage: Stage, roles: Roles, recipe: RLRecipe) -> None:
    """The step-0 eval of a run starting afresh (logged and said, when the env has one)."""
    metrics, per_task = evaluate(roles, recipe)
    if metrics:
        _log(stage, 0, metrics, per_task)
        say(f"{stage.name}: before training " + _fmt(metrics))


def eval_during(stage: Stage, roles: Roles, recipe: RLRecipe, step: int) -> dict[str, float]:
    """An eval at `step` (logged); its metrics, empty when the env has none."""
    metrics, per_task = evaluate(roles, recipe)
    if metrics:
        _log(stage, step, metrics, per_task)
    return metrics


def eval_final(stage: Stage, roles: Roles, recipe: RLRecipe) -> tuple[dict[str, float], AccuracyChange | None]:
    """The eval after the last step, and its paired comparison with the step-0 eval (saved)."""
    steps = recipe.rl.steps
    final, per_task = evaluate(roles, recipe)
    if not final:
        return final, None
    trim_jsonl(stage.path(EVAL), steps - 1)  # resumed at the last step: its final eval is redone
    before = _before(stage.path(EVAL))
    _log(stage, steps, final, per_task)
    say(f"{stage.name}: after {steps} steps " + _fmt(final))
    if before is None or per_task is None:
        return final, None
    change = accuracy_change(before, per_task)
    say(f"{stage.name}: " + change.line())
    atomic_write_json(stage.path(ACCURACY), asdict(change))
    return final, change


def _log(stage: Stage, step: int, metrics: dict[str, float], per_task: list[float] | None) -> None:
    extra = {"per_task_correct": per_task} if per_task is not None else {}
    append_jsonl(stage.path(EVAL), {"step": step, **metrics, **extra})


def _fmt(ev: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in ev.items())


def _before(path: Path) -> list[float] | None:
    """Per-task correctness before training (the latest step-0 eval; it may predate a resume)."""
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    first = next((r for r in reversed(records) if r.get("step") == 0), None)
    return None if first is None else first.get("per_task_correct")
