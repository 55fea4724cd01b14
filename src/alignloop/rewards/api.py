"""What RL sees of a reward: a callable scoring a batch of (context, response) pairs.

`contexts[i]` is the conversation so far as OpenAI-style messages (`{"role", "content"}` dicts)
and `responses[i]` the bot's candidate reply to it. A `RewardBatch` carries the scalar reward RL
optimises, each component it was built from (for per-batch logging), and which samples the safety
constraint flagged. Keep this file stable: RL code imports nothing else from `alignloop.rewards`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from alignloop.errors import AlignloopError


@dataclass
class RewardBatch:
    """Rewards for n samples. `components` maps a name (e.g. "continue", "safety") to an [n] array."""

    reward: np.ndarray  # [n] float
    components: dict[str, np.ndarray] = field(default_factory=dict)
    unsafe: np.ndarray | None = None  # [n] bool; None means all-False

    def __post_init__(self) -> None:
        self.reward = np.asarray(self.reward, dtype=np.float64).reshape(-1)
        n = len(self.reward)
        self.components = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.components.items()}
        self.unsafe = np.zeros(n, dtype=bool) if self.unsafe is None else np.asarray(self.unsafe, dtype=bool).reshape(-1)

    def __len__(self) -> int:
        return len(self.reward)

    def summary(self) -> dict[str, float]:
        """Batch means for logging: reward, unsafe rate and every component."""
        out = {"reward": float(self.reward.mean()) if len(self) else 0.0,
               "unsafe_rate": float(self.unsafe.mean()) if len(self) else 0.0}
        out.update({f"rm/{k}": float(v.mean()) if len(v) else 0.0 for k, v in self.components.items()})
        return out


class RewardFn(Protocol):
    def __call__(self, contexts: list[list[dict]], responses: list[str]) -> RewardBatch: ...


class ValidatedRewardFn:
    """Wraps a reward fn so that a broken one fails loudly and names the sample, not deep inside RL."""

    def __init__(self, fn: RewardFn, name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "name", None) or type(fn).__name__

    def __call__(self, contexts: list[list[dict]], responses: list[str]) -> RewardBatch:
        if len(contexts) != len(responses):
            raise AlignloopError(f"reward {self.name}: {len(contexts)} contexts but {len(responses)} responses")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise AlignloopError(f"reward {self.name}: response {i} is {type(r).__name__}, not str")
        n = len(responses)
        try:
            batch = self.fn(contexts, responses)
        except AlignloopError:
            raise
        except Exception as e:  # a reward that crashes should say where, then RL stops
            idx = _first_failing(self.fn, contexts, responses)
            where = f" at sample {idx}" if idx is not None else ""
            raise AlignloopError(f"reward {self.name} raised{where}: {type(e).__name__}: {e}") from e
        if not isinstance(batch, RewardBatch):
            raise AlignloopError(f"reward {self.name} returned {type(batch).__name__}, not RewardBatch")
        if len(batch.reward) != n:
            raise AlignloopError(f"reward {self.name} returned {len(batch.reward)} rewards for {n} samples")
        _check_finite(self.name, "reward", batch.reward)
        for k, v in batch.components.items():
            if len(v) != n:
                raise AlignloopError(f"reward {self.name}: component {k!r} has {len(v)} values for {n} samples")
            _check_finite(self.name, f"component {k!r}", v)
        if len(batch.unsafe) != n:
            raise AlignloopError(f"reward {self.name}: unsafe has {len(batch.unsafe)} values for {n} samples")
        return batch


def validated(fn: RewardFn, name: str | None = None) -> ValidatedRewardFn:
    """`fn` wrapped with shape/NaN/exception checks (idempotent)."""
    return fn if isinstance(fn, ValidatedRewardFn) else ValidatedRewardFn(fn, name)


def _check_finite(name: str, what: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise AlignloopError(f"reward {name}: {what} is {values[bad[0]]} at sample {int(bad[0])} ({len(bad)} non-finite)")


def _first_failing(fn: RewardFn, contexts: list[list[dict]], responses: list[str]) -> int | None:
    # Re-score one sample at a time only after a failure, to name the culprit.
    for i in range(len(responses)):
        try:
            fn([contexts[i]], [responses[i]])
        except Exception:
            return i
    return None
