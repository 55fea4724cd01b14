"""RL recipes (`alignloop rl grpo|ppo RECIPE`): which environment, how to sample, how to learn."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignloop.recipes import Section
from alignloop.rl.losses import Aggregation, KLKind
from alignloop.sections import ModelSection, RunSection
from alignloop.train.config import LoraSection
from alignloop.train.schedule import ScheduleKind

Algorithm = Literal["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo"]

# Each algorithm's defaults for the knobs that tell them apart; the recipe can override any.
AGGREGATION: dict[str, Aggregation] = {
    "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
    "rloo": "seq-mean-token-mean", "reinforce_pp": "token-mean", "ppo": "token-mean"}


class EnvSection(Section):
    kind: Literal["arithmetic", "reward_model", "user_sim", "tool"] = "arithmetic"
    # arithmetic (verifiable)
    max_operand: int = Field(50, ge=2, description="operands are drawn from 2..max_operand")
    correct_reward: float = 1.0
    format_reward: float = Field(0.1, description="for ending with 'Answer: <integer>'")
    answer_from: Literal["tag", "last_number"] = Field(
        "tag", description="the graded number: after the last 'Answer:' (tag), or the reply's last number")
    system: str | None = Field(None, description="system prompt (none: the template's default)")
    # reward_model
    reward: str | None = Field(None, description="an `rm train` folder (runs/<run>/rm) or 'package.module:factory' "
                               "returning a RewardFn (reward_model, user_sim)")
    prompts: str | None = Field(None, description="JSONL of {'messages': [...]} or {'prompt': ...} (reward_model env)")
    max_turns: int = Field(1, ge=1)
    eval_tasks: int = Field(64, ge=0, description="held-out tasks scored greedily at eval (arithmetic)")
    # user_sim: simulated users write the user turns; the learned reward says whether they stay
    users: int = Field(256, ge=1, description="simulated users (user_sim) or held-out users (groundtruth)")
    users_seed: int = Field(1000, description="their seed")
    stay_component: str = Field("continue", description="the reward component that is p(user stays)")
    # tool
    tool_family: str = Field("qwen2.5", description="chat family whose tool-call syntax the replies are parsed in")
    max_tool_calls: int = Field(2, ge=1)
    # evaluation only: never a reward
    groundtruth: bool = Field(False, description="reward_model: prompts from fresh simulated users; user_sim: the "
                              "simulated users themselves; their hidden taste scores every reply for the "
                              "reward-hacking check (evaluation only)")

    @model_validator(mode="after")
    def _needs_reward(self) -> EnvSection:
        if self.kind == "reward_model" and (not self.reward or not (self.prompts or self.groundtruth)):
            raise ValueError("env.kind = 'reward_model' needs env.reward and env.prompts (or env.groundtruth = true)")
        if self.kind == "user_sim" and not self.reward:
            raise ValueError("env.kind = 'user_sim' needs env.reward (the learned reward; it says who stays)")
        if self.groundtruth and self.kind not in ("reward_model", "user_sim"):
            raise ValueError("env.groundtruth works with env.kind = 'reward_model' (held-out users' prompts) or "
                             "'user_sim' (the simulated users' own taste)")
        return self


class RLSamplingSection(Section):
    temperature: float = Field(1.0, gt=0, description="the trainer scores tokens at the same temperature")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int = Field(64, ge=1, description="new tokens per turn")


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
    bf16: bool = Field(False, description="bf16 autocast in the trainer; on CPUs without AMX fp32 is faster")
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    micro_batch: int = Field(16, ge=1, description="sequences per forward/backward")
    share_prefix: bool = Field(True, description="score a prompt's group in one row, the prompt computed once")

    # the objective
    clip_low: float = Field(0.2, ge=0)
    clip_high: float | None = Field(None, ge=0, description="none: 0.28 for dapo (clip-higher), else clip_low")
    aggregation: Aggregation | None = Field(None, description="none: the algorithm's own")
    scale_rewards: bool | None = Field(None, description="divide by the group std; none: true for grpo/dapo")
    kl: KLKind = "none"
    beta: float = Field(0.0, ge=0, description="KL coefficient (needs kl != none)")
    entropy_coef: float = Field(0.0, ge=0)
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance sampling cap; none: off")
    epochs: int = Field(1, ge=1, description="passes over each rollout batch (PPO: several)")
    # PPO only
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    vf_coef: float = Field(0.5, ge=0)
    value_clip: float | None = Field(0.2, gt=0)

    # system
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
    env: EnvSection = EnvSection()
    sampling: RLSamplingSection = RLSamplingSection()
    rl: RLSection = RLSection()
