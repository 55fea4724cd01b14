"""`torch_threads(n)`: run a block with n torch threads, then put the caller's count back.

Benchmarks fix their thread count instead of guessing it from load, and reward-model training
pins its own; both must restore the caller's count, or a test that runs after them inherits it
(the kill-and-resume test compares a 2-thread child with the parent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads (0: leave the count as it is), then restore the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
