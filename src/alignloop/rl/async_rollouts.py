"""Async mode: a thread generates the rollouts of step t+1.. while the trainer trains step t.

Staleness is bounded: the rollout for step s may only start once the trainer has finished step
s - 1 - max_staleness, so it is sampled from a policy at most `max_staleness` updates behind the
one it trains. max_staleness = 0 is the synchronous schedule run through the same machinery.
torch's kernels release the GIL, so generation and training do overlap in one process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from alignloop.rl.rollout import Rollout


class AsyncRollouts:
    def __init__(self, make: Callable[[int], Rollout], start: int, steps: int, max_staleness: int) -> None:
        self.make = make
        self.max_staleness = max_staleness
        self._out: queue.Queue = queue.Queue(maxsize=max_staleness + 1)
        self._trained = start
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(start, steps), name="rollouts", daemon=True)
        self._thread.start()

    def _run(self, start: int, steps: int) -> None:
        try:
            for s in range(start + 1, steps + 1):
                with self._cond:
                    self._cond.wait_for(lambda s=s: self._stop or self._trained >= s - 1 - self.max_staleness)
                    if self._stop:
                        return
                self._out.put((s, self.make(s), None))
        except BaseException as e:  # noqa: BLE001 re-raised in the trainer's thread, where the run stops
            self._out.put((None, None, e))

    def get(self, step: int) -> Rollout:
        s, rollout, error = self._out.get()
        if error is not None:
            raise error
        assert s == step, f"rollout for step {s} arrived at step {step}"
        return rollout

    def trained(self, step: int) -> None:
        with self._cond:
            self._trained = step
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._out.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
