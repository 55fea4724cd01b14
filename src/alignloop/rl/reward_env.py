"""Single-turn reward-model environment: answer a prompt from the logs, get the learned reward.

The reward is whatever `RewardFn` the reward-model stage serves (the combined reward with its
components and the safety flag); it goes through `validated`, so a reward that raises, returns
NaN or the wrong count stops the run with the sample named.
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from alignloop.errors import AlignloopError
from alignloop.rewards import serve
from alignloop.rewards.api import RewardBatch, RewardFn, validated
from alignloop.rl.env import EnvSectionBase, Step
from alignloop.runs import MANIFEST


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


def reward_folder(spec: str) -> Path | None:
    """The `rm train` folder `spec` names (runs/<run>/rm, or the run folder holding it); None for a factory."""
    folder = Path(spec)
    if not folder.is_dir():
        return None
    return folder / "rm" if (folder / "rm").is_dir() else folder


def load_reward(spec: str) -> RewardFn:
    """A trained reward model's folder (`alignloop rm train`: runs/<run>/rm, or the run folder holding
    it) -> its combined RewardFn; or 'package.module:factory' -> factory() (a RewardFn)."""
    folder = reward_folder(spec)
    if folder is not None:
        return serve.load_reward_fn(folder)
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise AlignloopError(f"env.reward = {spec!r}: expected 'package.module:factory'")
    # The user's code: whatever its import or its factory raises (a SyntaxError, a missing file or
    # package, a bad setting) is their recipe's problem, said in one line, not a traceback.
    try:
        factory = getattr(importlib.import_module(module), attr)
    except AttributeError as e:
        raise AlignloopError(f"env.reward = {spec!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 see above
        raise AlignloopError(f"env.reward = {spec!r}: importing {module} failed: {_one_line(e)}") from None
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 see above
        raise AlignloopError(f"env.reward = {spec!r}: {attr}() raised {_one_line(e)}") from None


def _one_line(error: Exception) -> str:
    """`Type: message` on one line (a SyntaxError's message names its file and line)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class LearnedRewardSection(EnvSectionBase):
    """What the environments scored by a learned reward share (reward_model, user_sim)."""

    reward: str = Field(description="an `rm train` folder (runs/<run>/rm) or 'package.module:factory' "
                        "returning a RewardFn")
    system: str | None = Field(None, description="system prompt (none: the template's default)")
    # evaluation only: never a reward
    groundtruth: bool = Field(False, description="simulated users' hidden taste scores every reply for the "
                              "reward-hacking check (evaluation only)")
    users: int = Field(256, ge=1, description="simulated users (user_sim) or held-out users (groundtruth)")
    users_seed: int = Field(1000, description="their seed")

    def heldout_users(self) -> tuple[int, int] | None:
        return (self.users, self.users_seed) if self.groundtruth else None

    def inputs(self) -> list[str]:
        """The reward model's manifest: trained again, it is another reward and RL runs again."""
        folder = reward_folder(self.reward)
        manifest = folder / MANIFEST if folder is not None else None
        return [str(manifest)] if manifest is not None and manifest.is_file() else []


class RewardModelEnvSection(LearnedRewardSection):
    """`[env] kind = "reward_model"`: answer a prompt, get the learned reward. With groundtruth the
    prompts are fresh simulated users' first messages (the caller passes them to `build`)."""

    kind: Literal["reward_model"] = "reward_model"
    prompts: str | None = Field(None, description="JSONL of {'messages': [...]} or {'prompt': ...}")

    @model_validator(mode="after")
    def _needs_prompts(self) -> RewardModelEnvSection:
        if not (self.prompts or self.groundtruth):
            raise ValueError("env.kind = 'reward_model' needs env.prompts (or env.groundtruth = true)")
        return self

    def build(self, prompts: list[list[dict]] | None = None) -> RewardModelEnv:
        return RewardModelEnv(load_reward(self.reward), prompts if prompts is not None else read_prompts(self.prompts),
                              system=self.system)

    def inputs(self) -> list[str]:
        return ([self.prompts] if self.prompts else []) + super().inputs()


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

    def __call__(self, contexts: list[list[dict]], responses: list[str]) -> RewardBatch:
        return RewardBatch(np.array([min(len(r), 400) / 100.0 for r in responses]))


def length_reward() -> LengthReward:
    return LengthReward()
