"""The Inference role: the engine behind `InferenceEngine`, plus weight versions for staleness.

The trainer hands over weights after every step (`offer`); they are loaded in place before the
next generation starts, never in the middle of one, so every episode of a batch is sampled from
one policy version. In sync mode that is right away; in async mode generation of step t+1 may
already be running, and the new weights wait for it to finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence

import torch

from alignloop.engine.api import Completion, InferenceEngine, SamplingParams


class Inference:
    def __init__(self, engine: InferenceEngine) -> None:
        self.engine = engine
        self.version = 0  # optimizer steps reflected in the engine's weights
        self._pending: tuple[int, list[tuple[str, torch.Tensor]]] | None = None
        self._lock = threading.Lock()
        self.sync_seconds = 0.0

    def offer(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """New policy weights (materialised now: the trainer keeps changing its own)."""
        weights = [(n, t.detach().clone()) for n, t in named]
        with self._lock:
            self._pending = (version, weights)

    def apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            began = time.perf_counter()
            self.engine.load_weights(pending[1])
            self.version = pending[0]
            self.sync_seconds = time.perf_counter() - began

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Completion]:
        self.apply_pending()
        return self.engine.generate(list(prompts), list(params))
