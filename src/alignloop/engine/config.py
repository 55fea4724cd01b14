"""The generate recipe, and the sampling section every stage that generates text shares."""

from __future__ import annotations

from pydantic import Field

from alignloop.engine.api import SamplingParams
from alignloop.recipes import ExistingFile, Section
from alignloop.sections import ModelSection, RunSection


class SamplingSection(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(128, ge=1)
    stop: list[str] = []
    seed: int = 0

    def params(self, index: int = 0) -> SamplingParams:
        """Per-request params; request i gets seed + i so each sample path is its own."""
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            max_tokens=self.max_tokens, stop=tuple(self.stop), seed=self.seed + index,
        )


class GenerateSection(Section):
    prompts: ExistingFile
    chunk: int = Field(64, ge=1, description="requests per checkpointed chunk")
    max_batch: int = Field(64, ge=1)


class GenerateRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    sampling: SamplingSection = SamplingSection()
    generate: GenerateSection
