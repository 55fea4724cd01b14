"""The flywheel recipe: one TOML for a whole turn of the loop (and N turns of it).

Each section is the recipe of one stage, in the order the loop runs them; a stage reads only its
own section (plus `[run]` and `[flywheel]`), so changing `[abtest]` never re-trains anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.data.builders import BuildConfig
from alignloop.data.cli_pipeline import FilterSection
from alignloop.eval.abtest_stage import DecisionSection
from alignloop.eval.heldout import UsersSection
from alignloop.recipes import Section
from alignloop.sections import RunSection, SamplingSection
from alignloop.sim.config import EngineResponderSection, SimConfig
from alignloop.train.sft import SFTTrainSection

STAGES: tuple[str, ...] = ("simulate", "filter", "build", "sft", "rm", "rl", "eval", "abtest", "report")
"""The loop's stages, in order (`report` runs once, after the last turn). A turn runs those that
`alignloop.flywheel.stages.TURN_STAGES` implements: reward models and RL are not wired in yet."""


class FlywheelSection(Section):
    turns: int = Field(1, ge=1, description="turns of the loop; turn n+1's logs come from turn n's model")
    skip: list[Literal["eval"]] = Field(default_factory=list, description="optional stages to leave out")
    base_model: str = Field("smollm2-135m", description="the deployed model before the first turn")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class NextWorldSection(Section):
    """Turn 2+: users talking to the previous turn's model through the engine (slow: keep it small)."""

    users: int = Field(60, ge=1)
    days: int = Field(3, ge=1)
    max_turns: int = Field(6, ge=1)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)


class SFTStageSection(Section):
    train: SFTTrainSection = SFTTrainSection()
    dataset: Literal["sft"] = "sft"


class EvalStageSection(Section):
    """Offline evaluation of the deployed and the new model on held-out users' prompts."""

    users: UsersSection = UsersSection(users=64)
    sampling: SamplingSection = SamplingSection(temperature=0.7, max_tokens=48)
    judge: bool = Field(False, description="rubric scores by an LLM judge (slow on CPU)")
    judge_model: str | None = Field(None, description="the judge; default: the base model")
    judge_prompts: int = Field(16, ge=1, description="responses per model the judge grades")


class ABStageSection(Section):
    world: SimConfig = SimConfig(users=120, days=4, max_turns=6, seed=7)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)
    decision: DecisionSection = DecisionSection()


class FlywheelRecipe(Section):
    run: RunSection = RunSection()
    flywheel: FlywheelSection = FlywheelSection()
    world: SimConfig = SimConfig()
    next_world: NextWorldSection = NextWorldSection()
    filter: FilterSection = FilterSection()
    build: BuildConfig = BuildConfig()
    sft: SFTStageSection = SFTStageSection()
    eval: EvalStageSection = EvalStageSection()
    abtest: ABStageSection = ABStageSection()

    @model_validator(mode="after")
    def _worlds_apart(self) -> FlywheelRecipe:
        # Fresh users for the A/B test: its worlds must never reuse the log world's seed.
        if self.abtest.world.seed == self.world.seed:
            raise ValueError("abtest.world.seed must differ from world.seed (A/B users must be fresh)")
        if self.eval.users.seed == self.world.seed:
            raise ValueError("eval.users.seed must differ from world.seed (held-out users must be fresh)")
        return self
