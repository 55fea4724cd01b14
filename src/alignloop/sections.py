"""Recipe sections that every stage shares: where the run goes, which model, how to sample."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from alignloop.recipes import Section

if TYPE_CHECKING:  # the engine imports torch: not worth it for stages that only read a run section
    from alignloop.engine.api import SamplingParams


class RunSection(Section):
    name: str | None = Field(None, description="run folder name under `dir`; default: a timestamp")
    dir: str = "runs"


class ModelSection(Section):
    name: str = "smollm2-135m"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0  # only used by random-init presets (tiny-*)


class SamplingSection(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(128, ge=1)
    stop: list[str] = []
    seed: int = 0

    def params(self, index: int = 0) -> SamplingParams:
        """Per-request params; request i gets seed + i so each sample path is its own."""
        from alignloop.engine.api import SamplingParams

        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            max_tokens=self.max_tokens, stop=tuple(self.stop), seed=self.seed + index,
        )
