"""The Environment role: poses tasks, answers the policy's turns, says when an episode ends and its reward.

Batched, like the engine: `reset(tasks)` starts one episode per task and returns each one's first
observation (the conversation so far, OpenAI-style messages); `step(actions)` takes one reply per
episode (None for episodes already done) and returns the next observations, rewards and done flags.
An episode's reward is the sum of the rewards `step` returned for it.

Each environment kind has its recipe section beside it (`[env] kind = ...`), built on
`EnvSectionBase`; `alignloop.rl.config.EnvSection` is their union, told apart by `kind`.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import Field

from alignloop.recipes import Section


@dataclass
class Step:
    observations: list[list[dict] | None]   # the conversation to answer next; None when done
    rewards: np.ndarray                     # [n] reward for this step
    done: np.ndarray                        # [n] bool
    info: list[dict[str, Any]] = field(default_factory=list)  # per episode: metrics to log (numbers)


class Environment(Protocol):
    name: str

    def sample_tasks(self, n: int, seed: int) -> list[Any]:
        """n tasks drawn deterministically from `seed` (the same seed gives the same tasks)."""
        ...

    def reset(self, tasks: list[Any]) -> list[list[dict]]:
        ...

    def step(self, actions: list[str | None]) -> Step:
        ...


class EnvSectionBase(Section):
    """What every `[env]` section has: its kind, the turn cap, and how to build its environment."""

    kind: str
    max_turns: int = Field(1, ge=1, description="policy turns per episode at most")

    @abstractmethod
    def build(self, prompts: list[list[dict]] | None = None) -> Environment:
        """The environment; `prompts` (the caller's held-out users' first messages) replace the
        section's own prompts where the kind has any."""

    def inputs(self) -> list[str]:
        """Files the stage reads (its manifest records them)."""
        return []

    def heldout_users(self) -> tuple[int, int] | None:
        """(users, seed) of the simulated users whose hidden taste scores every reply for the
        reward-hacking watch (`env.groundtruth = true`); None when the kind has no such users."""
        return None
