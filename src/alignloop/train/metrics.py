"""`MetricLog`: where a trainer's per-step metrics go: the stage's metrics.jsonl, and the trackers
the recipe names in `[train] track` ("tensorboard", "trackio").

metrics.jsonl is the record every alignloop tool reads (`alignloop logs`, the reports); a tracker
is a view of the same numbers for people who watch runs in TensorBoard or Trackio. Both are
optional extras (`pip install alignloop[track]`), imported only when a recipe asks for them.

Only rank 0 writes (the caller decides: `MetricLog(..., enabled=ctx.is_main)`). A resumed run
logs its redone steps again: metrics.jsonl was trimmed at the checkpoint (`checkpoint.resume`),
and TensorBoard drops the events past it (`purge_step`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, get_args

from alignloop.errors import AlignloopError
from alignloop.runs import Stage
from alignloop.train.config import Tracker

TRACKERS: tuple[str, ...] = get_args(Tracker)
TENSORBOARD_DIR = "tensorboard"


class NonFiniteError(AlignloopError):
    """A NaN or an infinity among a step's metrics."""


def require_finite(metrics: dict[str, Any]) -> None:
    """metrics.jsonl stays JSON: a NaN or an infinity (`NaN`, `Infinity` in Python's json) is a `NonFiniteError`."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError("non-finite " + ", ".join(f"{k} ({v})" for k, v in bad.items()))


class MetricLog:
    """`log(step, metrics)` to metrics.jsonl and every tracker in `track`; `close()` at the end."""

    def __init__(self, stage: Stage, track: Sequence[str] = (), *, start: int = 0, enabled: bool = True) -> None:
        self.stage = stage
        self.enabled = enabled
        self._writers = [_open_tracker(kind, stage, start) for kind in track] if enabled else []

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.stage.log_metrics(step=step, **metrics)
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for writer in self._writers:
            writer.log(step, scalars)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


class _TensorBoard:
    def __init__(self, stage: Stage, start: int) -> None:
        # Optional extra: absent unless installed with alignloop[track].
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        # purge_step: a resumed run's events past its checkpoint are dropped, as they are redone.
        self.writer = SummaryWriter(str(stage.path(TENSORBOARD_DIR)), purge_step=start + 1 if start else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Trackio:
    def __init__(self, stage: Stage, start: int) -> None:
        # Optional extra: absent unless installed with alignloop[track].
        try:
            import trackio
        except ImportError:
            raise _missing("trackio") from None
        self.trackio = trackio
        # One project for every alignloop run; a resumed run continues its own run's curves.
        trackio.init(project="alignloop", name=f"{stage.run}/{stage.name}", config=stage.config,
                     resume="allow" if start else "never")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _open_tracker(kind: str, stage: Stage, start: int) -> _TensorBoard | _Trackio:
    if kind == "tensorboard":
        return _TensorBoard(stage, start)
    if kind == "trackio":
        return _Trackio(stage, start)
    raise ValueError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")


def _missing(package: str) -> AlignloopError:
    return AlignloopError(f"train.track asks for {package}, which is not installed: "
                          f"pip install 'alignloop[track]' (or pip install {package}), or drop it from train.track")
