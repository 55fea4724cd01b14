"""The model's context window as a limit on `train.max_seq_len`.

Packing restarts positions at every conversation, so a row may be wider than the model's context;
one conversation may not. A conversation longer than the positions the model was trained on
would still run (rotary embeddings extrapolate without complaint) and train on garbage, so a
recipe whose `max_seq_len` lets such conversations through is refused before any work.
"""

from __future__ import annotations

from typing import Any

from alignloop.errors import AlignloopError


def context_window(model: Any) -> int | None:
    """The longest sequence the model was built for (config.max_position_embeddings), if it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_fits_context(model: Any, max_seq_len: int, what: str = "model") -> None:
    """A one-line AlignloopError when one sequence of `max_seq_len` tokens exceeds `model`'s context."""
    window = context_window(model)
    if window is not None and max_seq_len > window:
        raise AlignloopError(f"train.max_seq_len={max_seq_len} is longer than the {what}'s context of {window} "
                             f"tokens (config.max_position_embeddings): set train.max_seq_len <= {window}; "
                             f"longer conversations are then skipped and counted")
