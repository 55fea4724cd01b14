"""Learning-rate schedules: a multiplier of the peak rate as a function of the optimizer step.

- `cosine`: linear warmup, then a half cosine from the peak down to `min_ratio` x peak.
- `multistep`: DeepSeek-LLM's schedule: linear warmup, constant at the peak, then x0.316 once 80% of
  the steps are done and x0.1 once 90% are. Its point is that the constant stretch lets a run be
  continued (or cut) without re-tuning a cosine tail, and the two drops recover most of the
  end-of-training gain of a cosine.
- `constant`: linear warmup, then the peak forever.

A `Schedule` is a plain object whose attributes are its whole state: `LambdaLR.state_dict()` saves
an lr-lambda's `__dict__`, so a checkpoint records the schedule it was trained with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScheduleKind = Literal["cosine", "multistep", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "multistep", "constant")

# DeepSeek-LLM (2024), section 2.3: "reduced to 31.6% of the maximum after processing 80% of the
# training tokens, and further reduced to 10% after 90%".
MULTISTEP_DROPS: tuple[tuple[float, float], ...] = ((0.8, 0.316), (0.9, 0.1))


class Schedule:
    """lr multiplier for step `s` (0-based: the step about to be taken)."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}; use one of {', '.join(SCHEDULES)}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.kind = kind
        self.total_steps = int(total_steps)
        # Warmup longer than the run would never reach the peak; cap it at the run.
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1) / warmup: the first step already moves the weights; a step at lr 0 is wasted.
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            factor = 1.0
            for at, value in MULTISTEP_DROPS:
                if step >= at * self.total_steps:
                    factor = value
            return factor
        # cosine over the steps after warmup, reaching min_ratio on the last step.
        span = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"Schedule({self.kind!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"min_ratio={self.min_ratio})")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR driving every param group by `schedule` (its state_dict is plain JSON data)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
