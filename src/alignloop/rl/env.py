"""The Environment role: poses tasks, answers the policy's turns, says when an episode ends and its reward.

Batched, like the engine: `reset(tasks)` starts one episode per task and returns each one's first
observation (the conversation so far, OpenAI-style messages); `step(actions)` takes one reply per
episode (None for episodes already done) and returns the next observations, rewards and done flags.
An episode's reward is the sum of the rewards `step` returned for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


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
