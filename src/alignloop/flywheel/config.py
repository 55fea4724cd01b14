"""The flywheel recipe: one TOML for a whole turn of the loop (and N turns of it).

Each section is the recipe of one stage, in the order the loop runs them; a stage reads only its
own section (plus `[run]` and `[flywheel]`), so changing `[abtest]` never re-trains anything.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from alignloop.data.builders import BuildConfig
from alignloop.data.config import FilterSection
from alignloop.eval.config import DecisionSection, OfflineEvalSection
from alignloop.recipes import Section
from alignloop.rewards.config import (
    HEADS,
    BackboneSection,
    CombineSection,
    EvalSection,
    HeadTrainSection,
    check_safety_head,
)
from alignloop.rl.config import RLSamplingSection, RLSection
from alignloop.sections import RunSection
from alignloop.sim.config import EngineResponderSection, SimConfig
from alignloop.train.config import DPOTrainSection, LossKind, SFTTrainSection
from alignloop.train.pretrain import MTPSection, PretrainDataSection

STAGES: tuple[str, ...] = ("simulate", "ingest", "filter", "build", "sft", "preference", "rm", "rl", "eval", "abtest",
                           "report")
"""The loop's stages, in order (`report` runs once, after the last turn). A turn's logs come from
`simulate` or `ingest` (`[logs] source`), never both; `preference` runs only when the recipe
switches it on (`[preference] enabled = true`)."""

SOURCES: tuple[str, ...] = ("simulate", "ingest")


class FlywheelSection(Section):
    turns: int = Field(1, ge=1, description="turns of the loop; turn n+1's logs come from turn n's model")
    skip: list[Literal["rm", "rl", "eval"]] = Field(
        default_factory=list, description="optional stages to leave out (without rl, the new model is SFT's)")
    base_model: str = Field("smollm2-135m", description="the deployed model before the first turn")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    deploy: Literal["simulate", "server"] = Field(
        "simulate", description="simulate: the deployed model answers inside the simulator and its tables are "
        "the logs; server: it runs behind `alignloop serve` (in this process, on loopback), the simulated "
        "users talk to it over HTTP and the logs are what the server's log store holds (slower: every "
        "answer is the real model, turn 1 included)")


class LogsSection(Section):
    """Where turn 1's logs come from: the simulated world (`[world]`), or real logs ingested from files
    or the chitchat dataset. Real logs have no simulated users behind them, so the stages that need
    them (the A/B test, ground-truth scoring) are left out with their reason (`not_run`)."""

    source: Literal["simulate", "ingest"] = Field(
        "simulate", description="simulate: the [world] section's simulated users; ingest: real logs (inputs, chitchat)")
    inputs: list[str] = Field(default_factory=list, description="ingest: log folders, JSONL/Parquet tables or chat "
                                                                 "exports (OpenAI, ShareGPT), as `alignloop logs ingest`")
    chitchat: bool = Field(False, description="ingest: also the chitchat-dataset package's conversations")
    format: Literal["auto", "logs", "openai", "sharegpt", "table"] = Field(
        "auto", description="ingest: how to read inputs (auto: told by content)")

    @model_validator(mode="after")
    def _inputs_need_ingest(self) -> LogsSection:
        if self.source == "ingest" and not (self.inputs or self.chitchat):
            raise ValueError('logs.source = "ingest" needs logs.inputs or logs.chitchat = true')
        if self.source == "simulate" and (self.inputs or self.chitchat):
            raise ValueError('logs.inputs and logs.chitchat are read only with logs.source = "ingest"')
        return self

    @property
    def real(self) -> bool:
        return self.source == "ingest"


class NextWorldSection(Section):
    """Turn 2+: users talking to the previous turn's model through the engine (slow: keep it small)."""

    users: int = Field(60, ge=1)
    days: int = Field(3, ge=1)
    max_turns: int = Field(6, ge=1)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)


class SFTStageSection(Section):
    train: SFTTrainSection = SFTTrainSection()
    dataset: Literal["sft"] = "sft"


class PretrainStageSection(Section):
    """Pre-training of `flywheel.base_model` from scratch before turn 1, for a random-init zoo preset
    (tiny-deepseek): its model is then the deployed one. Off by default (the base model as it is).
    Runs once per flywheel run, in runs/<run>/pretrain/ (`alignloop.train.pretrain`)."""

    enabled: bool = False
    data: PretrainDataSection = PretrainDataSection()
    train: SFTTrainSection = SFTTrainSection()
    mtp: MTPSection = MTPSection()


class PreferenceStageSection(Section):
    """Preference optimisation from the SFT model on this turn's logs, before the reward models and RL.

    Off by default. `loss` picks the objective (`alignloop.train.dpo`): the pair losses train on
    build/dpo.parquet (the swipe pairs), kto on build/rm/thumbs/train.parquet (thumbs up/down).
    `train` is the trainer's section; its own `loss` key is set from here."""

    enabled: bool = False
    loss: LossKind = Field("ld_dpo", description="dpo, ipo, simpo, ld_dpo, rdpo or kto")
    train: DPOTrainSection = DPOTrainSection()

    @model_validator(mode="before")
    @classmethod
    def _loss_into_train(cls, data: Any) -> Any:
        # One place says the loss; the trainer's per-loss beta default must see it when it validates.
        if not isinstance(data, dict):
            return data
        train = data.get("train", {})
        train = train.model_dump() if isinstance(train, DPOTrainSection) else dict(train)
        loss = data.get("loss", "ld_dpo")
        if "loss" in train and train["loss"] != loss:
            raise ValueError(f"set the loss as preference.loss, not preference.train.loss ({train['loss']!r})")
        return {**data, "train": {**train, "loss": loss}}


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
    env: Literal["single_turn", "multi_turn"] = Field(
        "single_turn", description="single_turn: answer each user's first message once; multi_turn: the users "
        "write every next message and stay while the learned p(continue) says so (alignloop.rl.user_env)")
    max_turns: int = Field(3, ge=1, description="multi_turn: bot turns per conversation at most")
    sampling: RLSamplingSection = RLSamplingSection(max_tokens=48)
    rl: RLSection = RLSection(steps=10, prompts_per_step=4, group=4, lr=2e-5)


class ABStageSection(Section):
    world: SimConfig = SimConfig(users=120, days=4, max_turns=6, seed=7)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)
    decision: DecisionSection = DecisionSection()


class FlywheelRecipe(Section):
    run: RunSection = RunSection()
    flywheel: FlywheelSection = FlywheelSection()
    logs: LogsSection = LogsSection()
    world: SimConfig = SimConfig()
    next_world: NextWorldSection = NextWorldSection()
    filter: FilterSection = FilterSection()
    build: BuildConfig = BuildConfig()
    pretrain: PretrainStageSection = PretrainStageSection()
    sft: SFTStageSection = SFTStageSection()
    preference: PreferenceStageSection = PreferenceStageSection()
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
        if self.logs.real and self.flywheel.deploy == "server":
            raise ValueError('flywheel.deploy = "server" needs simulated users to talk to the server; with '
                             'logs.source = "ingest" the logs are already there')
        if self.logs.real and self.flywheel.turns > 1:
            # Turn n+1's logs are users talking to turn n's model; real users are not here to do that.
            raise ValueError('flywheel.turns must be 1 with logs.source = "ingest": turn 2 would need users '
                             "talking to turn 1's model, and ingested logs have none")
        self._multi_turn_rl_fits()
        return self

    def _multi_turn_rl_fits(self) -> None:
        """Multi-turn RL talks to simulated users, and whether they stay is the learned continue head's call."""
        if self.rl.env != "multi_turn":
            return
        if self.logs.real:
            raise ValueError('rl.env = "multi_turn" needs simulated users to write the next messages; with '
                             'logs.source = "ingest" use rl.env = "single_turn" (RL on the logs\' prompts)')
        if self.rl.reward == "learned" and "continue" not in self.rm.heads:
            raise ValueError('rl.env = "multi_turn" needs "continue" in rm.heads: its p(continue) says whether '
                             "the simulated user stays for another turn")


def not_run(recipe: FlywheelRecipe) -> dict[str, str]:
    """What a turn leaves out because of where its logs come from: name -> the reason, one line each
    (printed and reported, so nothing is missing without a word)."""
    if not recipe.logs.real:
        return {}
    return {
        "simulate": 'the logs are real (logs.source = "ingest")',
        "abtest": "no A/B test: it needs users to show both models to, and ingested logs are a record of past "
                  "users, not people to run an experiment on (a real A/B test needs live traffic)",
        "rl ground-truth watch": "no reward-hacking watch against ground truth: real logs carry no hidden taste to "
                                 "score RL's answers with; RL's reward is the learned one only",
        "eval ground truth": "no ground-truth engagement in the offline eval: nobody's true taste is known; "
                             "measured instead: the learned reward and rule metrics on held-out users' prompts",
    }
