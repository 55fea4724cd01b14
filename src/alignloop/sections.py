"""Recipe sections that every stage shares: where the run goes and which model.

How to sample is the engine's: `alignloop.engine.config.SamplingSection`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.recipes import Section


class RunSection(Section):
    name: str | None = Field(None, description="run folder name under `dir`; default: a timestamp")
    dir: str = "runs"


class ModelSection(Section):
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0  # only used by random-init presets (tiny-*)
