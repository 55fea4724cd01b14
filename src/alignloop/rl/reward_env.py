"""Single-turn reward-model environment: answer a prompt from the logs, get the learned reward.

The reward is whatever `RewardFn` the reward-model stage serves (the combined reward with its
components and the safety flag); it goes through `validated`, so a reward that raises, returns
NaN or the wrong count stops the run with the sample named.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from alignloop.errors import AlignloopError
from alignloop.rewards.api import RewardFn, validated
from alignloop.rl.env import Step


def read_prompts(path: str | Path) -> list[list[dict]]:
    """JSONL lines of {"messages": [...]} (ending with a user turn) or {"prompt": "..."}."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise AlignloopError(f"{path}:{n}: not JSON ({e})") from None
        if isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
        elif isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise AlignloopError(f"{path}:{n}: expected 'messages' (a list) or 'prompt' (a string)")
        if messages[-1].get("role") != "user":
            raise AlignloopError(f"{path}:{n}: the conversation must end with a user turn")
        prompts.append(messages)
    if not prompts:
        raise AlignloopError(f"{path}: no prompts")
    return prompts


def load_reward(spec: str) -> RewardFn:
    """A trained reward model's folder (`alignloop rm train`: runs/<run>/rm, or the run folder holding
    it) -> its combined RewardFn; or 'package.module:factory' -> factory() (a RewardFn)."""
    import importlib

    folder = Path(spec)
    if folder.is_dir():
        from alignloop.rewards.serve import load_reward_fn

        return load_reward_fn(folder / "rm" if (folder / "rm").is_dir() else folder)
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise AlignloopError(f"env.reward = {spec!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise AlignloopError(f"env.reward = {spec!r}: {e}") from None
    return factory()


class RewardModelEnv:
    name = "reward_model"

    def __init__(self, reward: RewardFn, prompts: list[list[dict]], system: str | None = None) -> None:
        self.reward = validated(reward)
        head = [{"role": "system", "content": system}] if system else []
        self.prompts = [p if p and p[0].get("role") == "system" else head + p for p in prompts]
        self._contexts: list[list[dict]] = []

    def sample_tasks(self, n: int, seed: int) -> list[int]:
        return random.Random(f"rm-prompts:{seed}").sample(range(len(self.prompts)), k=min(n, len(self.prompts)))

    def reset(self, tasks: list[int]) -> list[list[dict]]:
        self._contexts = [self.prompts[i] for i in tasks]
        return [list(c) for c in self._contexts]

    def step(self, actions: list[str | None]) -> Step:
        batch = self.reward(self._contexts, [a or "" for a in actions])
        info = [{"unsafe": float(batch.unsafe[i]), **{f"rm/{k}": float(v[i]) for k, v in batch.components.items()}}
                for i in range(len(actions))]
        return Step([None] * len(actions), np.asarray(batch.reward, dtype=float),
                    np.ones(len(actions), dtype=bool), info)


class LengthReward:
    """A deliberately hackable reward that pays for length alone (demos and the reward-hacking test)."""

    name = "length"

    def __call__(self, contexts: list[list[dict]], responses: list[str]):
        from alignloop.rewards.api import RewardBatch

        return RewardBatch(np.array([min(len(r), 400) / 100.0 for r in responses]))


def length_reward() -> LengthReward:
    return LengthReward()
