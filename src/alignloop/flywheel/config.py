"""The flywheel recipe: one TOML for a whole turn of the loop (and N turns of it).

Each section is the recipe of one stage, in the order the loop runs them; a stage reads only its
own section (plus `[run]` and `[flywheel]`), so changing `[abtest]` never re-trains anything.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.data.builders import BuildConfig
from alignloop.data.config import FilterSection
from alignloop.eval.config import DecisionSection, OfflineEvalSection
from alignloop.recipes import Section
from alignloop.rewards.config import (HEADS, BackboneSection, CombineSection, EvalSection, HeadTrainSection,
                                      check_safety_head)
from alignloop.rl.config import RLSamplingSection, RLSection
from alignloop.sections import RunSection
from alignloop.sim.config import EngineResponderSection, SimConfig
from alignloop.train.config import SFTTrainSection

STAGES: tuple[str, ...] = ("simulate", "filter", "build", "sft", "rm", "rl", "eval", "abtest", "report")
"""The loop's stages, in order (`report` runs once, after the last turn)."""


class FlywheelSection(Section):
    turns: int = Field(1, ge=1, description="turns of the loop; turn n+1's logs come from turn n's model")
    skip: list[Literal["rm", "rl", "eval"]] = Field(
        default_factory=list, description="optional stages to leave out (without rl, the new model is SFT's)")
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


class RMStageSection(Section):
    """Reward models on this turn's `build/rm` sets (see `alignloop.rewards`)."""

    heads: list[str] = Field(default_factory=lambda: [h for h in HEADS if h != "quality"])
    max_train_rows: int | None = Field(4000, ge=1)
    max_eval_rows: int | None = Field(2000, ge=1)
    backbone: BackboneSection = BackboneSection()
    train: HeadTrainSection = HeadTrainSection()
    eval: EvalSection = EvalSection()
    combine: CombineSection = CombineSection()

    @model_validator(mode="after")
    def _weights_have_heads(self) -> RMStageSection:
        # Caught here, when the recipe loads, not after minutes of training the heads.
        missing = sorted(set(self.combine.weights) - set(self.heads))
        if missing:
            raise ValueError(f"rm.combine.weights name component(s) {missing} that rm.heads does not train "
                             f"(heads: {', '.join(self.heads)})")
        check_safety_head(self.heads, self.combine, "rm.heads", "rm.combine")
        return self


class RLStageSection(Section):
    """GRPO (or another algorithm) from the SFT model against the learned combined reward, on prompts
    of fresh simulated users; their hidden taste scores every sample for the reward-hacking watch."""

    reward: str = Field("learned", description="learned: this turn's reward models combined (rm.combine); or "
                        "'package.module:factory', e.g. alignloop.rl.reward_env:length_reward, a reward that "
                        "pays for length alone: a deliberately hackable arm the watch and the A/B must catch")
    users: int = Field(64, ge=1, description="simulated users whose first messages are the RL prompts")
    users_seed: int = Field(2000, description="their seed: neither the log world's nor the eval users'")
    sampling: RLSamplingSection = RLSamplingSection(max_tokens=48)
    rl: RLSection = RLSection(steps=10, prompts_per_step=4, group=4, lr=2e-5)


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
    rm: RMStageSection = RMStageSection()
    rl: RLStageSection = RLStageSection()
    eval: OfflineEvalSection = OfflineEvalSection()
    abtest: ABStageSection = ABStageSection()

    @model_validator(mode="after")
    def _worlds_apart(self) -> FlywheelRecipe:
        # Fresh users for the A/B test: its worlds must never reuse the log world's seed.
        if self.abtest.world.seed == self.world.seed:
            raise ValueError("abtest.world.seed must differ from world.seed (A/B users must be fresh)")
        if self.eval.users.seed == self.world.seed:
            raise ValueError("eval.users.seed must differ from world.seed (held-out users must be fresh)")
        if self.rl.users_seed in (self.world.seed, self.eval.users.seed):
            raise ValueError("rl.users_seed must differ from world.seed and eval.users.seed "
                             "(RL prompts come from users nobody evaluates on)")
        return self
