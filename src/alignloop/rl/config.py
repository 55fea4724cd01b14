"""RL recipes (`alignloop rl grpo|ppo RECIPE`): which environment, how to sample, how to learn."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from alignloop.engine.api import SamplingParams
from alignloop.recipes import Section
from alignloop.rl.agent_env import AgentEnvSection
from alignloop.rl.arithmetic import ArithmeticEnvSection
from alignloop.rl.losses import Aggregation, KLKind
from alignloop.rl.reward_env import RewardModelEnvSection
from alignloop.rl.tool_env import ToolEnvSection
from alignloop.rl.user_env import UserSimEnvSection
from alignloop.sections import ModelSection, RunSection
from alignloop.train.config import LoraSection
from alignloop.train.schedule import ScheduleKind

Algorithm = Literal["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo"]

# Each algorithm's defaults for the knobs that tell them apart; the recipe can override any.
AGGREGATION: dict[str, Aggregation] = {
    "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
    "rloo": "seq-mean-token-mean", "reinforce_pp": "token-mean", "ppo": "token-mean"}


def _env_kind(value: Any) -> str:
    # A recipe without `kind` is arithmetic (the verifiable default).
    return value.get("kind", "arithmetic") if isinstance(value, dict) else value.kind


# One section per environment kind, each defined beside its environment; `kind` picks which, so a
# key of another kind is an unknown key like any typo.
EnvSection = Annotated[
    Annotated[ArithmeticEnvSection, Tag("arithmetic")] | Annotated[RewardModelEnvSection, Tag("reward_model")]
    | Annotated[UserSimEnvSection, Tag("user_sim")] | Annotated[ToolEnvSection, Tag("tool")]
    | Annotated[AgentEnvSection, Tag("agent")],
    Discriminator(_env_kind, custom_error_type="env_kind",
                  custom_error_message="kind should be 'arithmetic', 'reward_model', 'user_sim', 'tool' or 'agent'")]


class RLSamplingSection(Section):
    temperature: float = Field(1.0, gt=0, description="the trainer scores tokens at the same temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(64, ge=1, description="new tokens per turn")

    def params(self) -> SamplingParams:
        """The engine's params for a step's episodes (each episode's seed is set by `play`)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens)


class RLSection(Section):
    algorithm: Algorithm = "grpo"
    prompts_per_step: int = Field(8, ge=1)
    group: int = Field(8, ge=1, description="generations per prompt")
    steps: int = Field(20, ge=1)

    # optimizer and schedule (names as in train)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    schedule: ScheduleKind = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    lora: LoraSection | None = LoraSection()
    bf16: bool = Field(False, description="bf16 autocast in the trainer (faster where the CPU multiplies bf16 "
                       "natively, AMX or AVX512-BF16: measure with `alignloop bench grpo --dtype`)")
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    micro_batch: int = Field(16, ge=1, description="sequences per forward/backward")
    share_prefix: bool = Field(True, description="score a prompt's group in one row, the prompt computed once")

    # the objective
    clip_low: float = Field(0.2, ge=0)
    clip_high: float | None = Field(None, ge=0, description="none: 0.28 for dapo (clip-higher), else clip_low")
    aggregation: Aggregation | None = Field(None, description="none: the algorithm's own")
    scale_rewards: bool | None = Field(None, description="divide by the group std; none: true for grpo/dapo")
    kl: KLKind = Field("none", description="KL(policy || reference) estimator: in the loss (group methods), "
                       "in the per-token reward (ppo; k1 is PPO-RLHF's)")
    beta: float = Field(0.0, ge=0, description="KL coefficient (needs kl != none)")
    entropy_coef: float = Field(0.0, ge=0)
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance sampling cap; none: off")
    routing_replay: bool = Field(True, description="MoE policies: the trainer's forward routes every token to the "
                                 "experts the engine chose for it (our engine records them), so the two "
                                 "log-probs differ by numerics only; no effect on dense models")
    replay_check: bool = Field(False, description="MoE: also score each batch with the other routing (no_grad) and "
                               "log both gaps to the engine's log-probs (noreplay/engine_gap, ...); "
                               "one more forward per micro batch")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch (PPO: several)")
    # PPO only
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.5, ge=0)
    value_clip: float | None = Field(0.2, gt=0)

    # system
    inference: Literal["engine", "vllm", "auto"] = Field(
        "auto", description="who generates rollouts: our engine, vLLM (in this process; needs `import vllm`), "
        "or auto: vLLM where a CUDA GPU is present and vLLM imports, else our engine")
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(1, ge=0, description="async: rollouts may come from a policy this many steps old")
    max_context: int = Field(1024, ge=16)

    # bookkeeping
    save_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="greedy eval on held-out tasks every N steps (0: start and end only)")
    samples_per_step: int = Field(4, ge=0, description="episodes written to samples.jsonl per step")
    seed: int = 0

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_off(cls, value: Any) -> Any:
        if value is False or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
            return None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RLSection:
        if self.algorithm in ("grpo", "dr_grpo", "dapo", "rloo") and self.group < 2:
            raise ValueError(f"{self.algorithm} compares answers to one prompt: group must be >= 2")
        if self.beta > 0 and self.kl == "none":
            raise ValueError("beta > 0 needs a KL estimator: set kl = 'k1', 'k2' or 'k3'")
        return self

    @property
    def high(self) -> float:
        if self.clip_high is not None:
            return self.clip_high
        return 0.28 if self.algorithm == "dapo" else self.clip_low

    @property
    def agg(self) -> Aggregation:
        return self.aggregation or AGGREGATION[self.algorithm]

    @property
    def scale(self) -> bool:
        if self.scale_rewards is not None:
            return self.scale_rewards
        return self.algorithm in ("grpo", "dapo")


class RLRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    env: EnvSection = ArithmeticEnvSection()
    sampling: RLSamplingSection = RLSamplingSection()
    rl: RLSection = RLSection()
