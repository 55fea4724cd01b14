"""A model answers evaluation prompts through the engine, one seeded sample per prompt.

Prompt i gets sampling seed `seed + i` whichever model answers, so two models are compared on the
same prompts with the same random stream position, and a rerun gives the same texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from alignloop.engine.config import SamplingSection
from alignloop.engine.engine import Engine
from alignloop.ui import status


def answer(model: str, conversations: Sequence[list[dict]], sampling: SamplingSection, max_batch: int = 64,
           dtype: str = "auto", seed: int = 0) -> list[str]:
    """The model's answer (text, stripped) to each conversation; `model` is a zoo name or a checkpoint folder
    (a train stage's model/: LoRA adapters are merged there)."""
    with status(f"loading {model}"):
        engine = Engine.from_name(model, seed=seed, dtype=dtype, max_batch=max_batch)
    base = sampling.params(0)
    params = [replace(base, seed=sampling.seed + i) for i in range(len(conversations))]
    completions = engine.chat(list(conversations), params)
    return [c.text.strip() for c in completions]
