"""Safety in the loop: the reward's Lagrangian multiplier moves once per RL step.

The combined reward (`alignloop.rewards.serve.CombinedReward`) subtracts lambda * p_unsafe and
keeps lambda in a `Lagrangian` (projected dual ascent towards an unsafe-rate budget). Left alone
it would move lambda after every call, i.e. once per turn of a multi-turn step and once per eval
batch. The loop owns the schedule instead: every call of a step pays the same price, and after the
step lambda moves once, on the step's mean p_unsafe over all its scored replies (the rate the
budget is stated in). lambda goes into the metrics and the checkpoints (a resumed run carries on
with the price it had).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _combined(reward: Any) -> Any | None:
    """The object holding a `lagrangian` inside a (validated) RewardFn, if it uses one."""
    fn = reward
    for _ in range(4):  # unwrap ValidatedRewardFn and similar thin wrappers
        if hasattr(fn, "lagrangian"):
            config = getattr(fn, "config", None)
            return fn if getattr(config, "lagrangian", True) else None
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    return None


class StepDual:
    """Wraps an environment's reward: records p_unsafe of every call, moves lambda in `update`."""

    def __init__(self, reward: Any, combined: Any) -> None:
        self.inner = reward
        self.combined = combined
        self.name = getattr(reward, "name", "reward")
        combined.dual_updates_per_call = False
        self._rates: list[np.ndarray] = []

    def __call__(self, contexts, responses):
        batch = self.inner(contexts, responses)
        p = batch.components.get("p_unsafe")
        self._rates.append(np.asarray(p if p is not None else batch.unsafe, dtype=float))
        return batch

    @property
    def value(self) -> float:
        return float(self.combined.lagrangian.value)

    def set(self, value: float) -> None:
        self.combined.lagrangian.value = float(value)

    def update(self) -> dict[str, float]:
        """After a step: lambda <- clip(lambda + lr (rate - budget)); the step's numbers for the log."""
        rates = np.concatenate(self._rates) if self._rates else np.zeros(0)
        self._rates = []
        rate = float(rates.mean()) if rates.size else 0.0
        paid = self.value
        lam = self.combined.lagrangian.update(rate)
        return {"safety/p_unsafe": rate, "safety/lambda": paid, "safety/lambda_next": lam,
                "safety/budget": float(self.combined.lagrangian.budget)}


def attach(env: Any) -> StepDual | None:
    """Put a StepDual between `env` and its reward when that reward has a Lagrangian; else None."""
    reward = getattr(env, "reward", None)
    combined = _combined(reward) if reward is not None else None
    if combined is None:
        return None
    dual = StepDual(reward, combined)
    env.reward = dual
    return dual
