"""The evaluation recipes and sections: `eval groundtruth` (GroundTruthRecipe), `abtest` (ABTestRecipe),
and the flywheel's offline evaluation of a deployed and a new model (OfflineEvalSection)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignloop.engine.config import SamplingSection
from alignloop.eval.abtest import METRICS, ABSettings, require_observable
from alignloop.eval.heldout import UsersSection
from alignloop.recipes import ExistingFile, Section
from alignloop.sections import RunSection
from alignloop.sim.config import EngineResponderSection, SimConfig

# --- eval groundtruth --------------------------------------------------------------------------


class EngineSection(Section):
    max_batch: int = Field(64, ge=1)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class PairsSection(Section):
    """Held-out preference pairs (the builders' `dpo` table of a world no model trained on)."""

    path: ExistingFile = Field(description="JSONL or Parquet pairs: prompt, chosen, rejected, user_id")
    reference: str = Field("smollm2-135m", description="the common reference model (zoo name or folder)")
    split: Literal["all", "eval"] = Field("all", description="all pairs, or only the DPO trainer's held-out users")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="split = eval: as the DPO recipe's train.eval_fraction")
    salt: str = Field("dpo-split", description="split = eval: as the DPO recipe's train.split_salt")
    max_pairs: int | None = Field(None, ge=1, description="score a fixed random subset of this many pairs")
    max_seq_len: int = Field(1024, ge=8)
    micro_batch: int = Field(8, ge=1)
    bf16: bool = False
    exclude: list[str] = Field(default_factory=list, description="training datasets whose users must not appear")
    start: dict[str, str] = Field(
        default_factory=dict,
        description="label = the label it was trained from ('reference' for the reference model): each such "
                    "model is also scored against its own start, as its trainer measured it, and compared "
                    "pair by pair with its start's own score")


class GroundTruthRecipe(Section):
    run: RunSection = RunSection()
    models: dict[str, str] = Field(description="label = model (zoo name or checkpoint folder), in report order")
    baseline: str | None = Field(None, description="the label every other model is compared with; default: first")
    users: UsersSection = UsersSection()
    sampling: SamplingSection = SamplingSection()
    engine: EngineSection = EngineSection()
    pairs: PairsSection | None = None

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs_off(cls, value: Any) -> Any:
        # TOML has no null: `--set pairs=false` switches the pair evaluation off.
        return None if value is False else value

    @model_validator(mode="after")
    def _labels(self) -> GroundTruthRecipe:
        if not self.models:
            raise ValueError("models: name at least one model")
        bad = [label for label in self.models if not label.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ValueError(f"models: labels must be letters, digits, - or _ (they name files), got {bad[0]!r}")
        if self.baseline is not None and self.baseline not in self.models:
            raise ValueError(f"baseline: '{self.baseline}' is not a label of [models] ({', '.join(self.models)})")
        for label, start in (self.pairs.start if self.pairs else {}).items():
            for key, value in (("label", label), ("start", start)):
                if value not in self.models and not (key == "start" and value == "reference"):
                    raise ValueError(f"pairs.start: {key} '{value}' is not a label of [models] "
                                     f"({', '.join(self.models)}){' or reference' if key == 'start' else ''}")
            if label == start:
                raise ValueError(f"pairs.start: '{label}' cannot start from itself")
        return self

    @property
    def baseline_label(self) -> str:
        return self.baseline or next(iter(self.models))


# --- abtest ------------------------------------------------------------------------------------


class DecisionSection(Section):
    """The launch decision: on observable KPIs only (a `gt_*` metric here is an error); the ground truth
    is reported beside it (see `alignloop.eval.abtest`)."""

    primary: str = Field("continue_rate", description="the KPI that must rise significantly")
    guardrails: list[str] = Field(["turns_per_session", "return_1d", "thumbs_up_rate"],
                                  description="KPIs none of which may fall significantly")
    alpha: float = Field(0.05, gt=0, lt=1)
    power: float = Field(0.8, gt=0, lt=1, description="for the primary metric's minimum detectable effect")
    unsafe_bar: float = Field(0.03, ge=0, le=1, description="highest unsafe rate a launch may have")
    srm_alpha: float = Field(0.001, gt=0, lt=1)
    resamples: int = Field(2000, ge=100)
    seed: int = 0

    @model_validator(mode="after")
    def _known_metrics(self) -> DecisionSection:
        unknown = {self.primary, *self.guardrails} - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(METRICS)}")
        require_observable(self.primary, self.guardrails)
        return self

    def settings(self) -> ABSettings:
        return ABSettings(self.primary, tuple(self.guardrails), self.alpha, self.unsafe_bar,
                          self.srm_alpha, self.resamples, self.seed, self.power)


class ABTestRecipe(Section):
    run: RunSection = RunSection()
    world: SimConfig = SimConfig(users=200, days=7, max_turns=8)
    engine: EngineResponderSection = EngineResponderSection(max_tokens=48)
    decision: DecisionSection = DecisionSection()


# --- offline evaluation (flywheel) -------------------------------------------------------------


class JudgeEndpointSection(Section):
    """An OpenAI-compatible chat-completions server as the rubric judge (vLLM, llama.cpp, a hosted API)."""

    base_url: str = Field(description="e.g. http://localhost:8000/v1 (/v1/chat/completions is added as needed)")
    model: str = Field(description="the model name the server expects")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (never the key)")
    timeout_s: float = Field(60.0, gt=0)
    concurrency: int = Field(4, ge=1, description="requests in flight")
    max_tokens: int = Field(16, ge=1, description="per answer; the judge is asked for one line `Score: N`")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value


class OfflineEvalSection(Section):
    """Offline evaluation of the deployed and the new model on held-out users' prompts (simulated
    users', or with real logs the held-out split's own prompts)."""

    users: UsersSection = UsersSection(users=64)
    max_prompts: int = Field(64, ge=1, description="real logs (flywheel logs.source = \"ingest\"): held-out users' "
                                                   "prompts asked (build/rl/eval.jsonl), a stable sample")
    sampling: SamplingSection = SamplingSection(temperature=0.7, max_tokens=48)
    judge: bool = Field(False, description="rubric scores by an LLM judge (slow on CPU)")
    judge_model: str | None = Field(None, description="a local judge (zoo name or folder); default: the base model")
    judge_endpoint: JudgeEndpointSection | None = Field(
        None, description="judge through an OpenAI-compatible endpoint instead of a local model")
    judge_prompts: int = Field(16, ge=1, description="responses per model the judge grades")
    judge_min_parse_rate: float = Field(
        0.8, ge=0, le=1, description="below this share of answers holding a score the judge is reported unavailable "
                                     "(parsed k of n), not as scores")

    @model_validator(mode="after")
    def _one_judge(self) -> OfflineEvalSection:
        if self.judge_endpoint is not None and self.judge_model is not None:
            raise ValueError("judge_model and judge_endpoint both name a judge: keep one")
        return self
