"""The `rm` recipe: which reward-model datasets, which backbone, how to train the heads, how to combine them.

One recipe serves `alignloop rm train`, `rm eval` and `reward fit-weights`: they write
runs/<run>/rm/, runs/<run>/rm-eval/ and runs/<run>/reward/ respectively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from alignloop.recipes import ExistingFile, Section
from alignloop.sections import RunSection
from alignloop.train.config import LoraSection

HEADS: tuple[str, ...] = ("preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d",
                          "returned_7d", "quality", "safety")
Head = Literal["preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d", "returned_7d",
               "quality", "safety"]
BINARY: frozenset[str] = frozenset({"thumbs", "continue", "returned_1d", "returned_7d", "safety"})
REGRESSION: frozenset[str] = frozenset({"turns_after", "time_to_next", "quality"})


class DataSection(Section):
    build: str = Field("runs/logs-demo/build", description="a `logs build` folder holding rm/<signal>/{train,eval}")
    heads: list[Head] = Field(default_factory=lambda: [h for h in HEADS if h != "quality"])
    max_train_rows: int | None = Field(6000, ge=1, description="per head, a seeded sample; none: all")
    max_eval_rows: int | None = Field(3000, ge=1, description="per head, a seeded sample; none: all")
    quality_labels: ExistingFile | None = Field(
        None, description="rubric labels (turn_id, label in [0, 1]) for the quality head; logs carry none")
    ground_truth: str = Field("auto", description="simulator ground truth for the ceiling (evaluation only): "
                                                  "auto = <build>/../simulate/ground_truth if present; none = off")
    seed: int = 0

    @model_validator(mode="after")
    def _quality_needs_labels(self) -> DataSection:
        if "quality" in self.heads and self.quality_labels is None:
            raise ValueError("head 'quality' needs data.quality_labels (the logs have no rubric labels)")
        if not self.heads:
            raise ValueError("data.heads is empty")
        return self


class BackboneSection(Section):
    kind: Literal["minilm", "lm"] = Field("minilm", description="minilm: frozen all-MiniLM-L6-v2 + small heads; "
                                                                 "lm: a zoo causal LM with LoRA + value heads")
    model: str = Field("tiny", description="lm only: zoo model name")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the backbone's weights and activations; minilm in bfloat16: about 2x faster on a CPU "
                               "with AVX512-BF16 or AMX, embeddings within ~3e-3 of fp32 (its own cache)")
    max_length: int = Field(128, ge=8, description="tokens per text (minilm) or per conversation (lm, left-cut)")
    batch_size: int = Field(64, ge=1, description="texts per encoder forward")
    text_stats: bool = Field(True, description="add surface statistics of the text (length, overlap, repeats)")
    threads: int = Field(1, ge=0, description="torch threads while training/scoring; 1 avoids oversubscribing "
                                              "a shared CPU (small matmuls gain nothing from more); 0 = torch default")
    lora: LoraSection = LoraSection(r=8, alpha=16, dropout=0.0)


class HeadTrainSection(Section):
    hidden: int = Field(128, ge=0, description="hidden units per head; 0 = linear")
    steps: int = Field(400, ge=1, description="optimizer steps; each step draws one batch per head")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="training users held out for early stopping: each "
                                                              "head keeps its state of lowest validation loss")
    eval_every: int = Field(25, ge=1, description="steps between validation losses")
    calibrate: bool = Field(True, description="fit each binary/regression head's scale and shift on the held-out "
                                              "training users (Platt scaling / least squares)")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(5e-4, gt=0)
    backbone_lr: float = Field(2e-4, gt=0, description="lm: LoRA learning rate")
    weight_decay: float = Field(1e-2, ge=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    user_activity: bool = Field(False, description="let the served heads see user-activity features too "
                                                   "(the shortcut check always trains both variants)")
    time_censor_seconds: float | None = Field(None, gt=0, description="time_to_next: a no-reply counts as 'later "
                                                                      "than this'; none = longest observed reply")
    seed: int = 0


class EvalSection(Section):
    shortcut: bool = Field(True, description="retrain heads with user-activity features and compare")
    plot: bool = True
    ece_bins: int = Field(10, ge=2)


class CombineSection(Section):
    weights: dict[str, float] = Field(
        default_factory=lambda: {"preference": 1.0, "thumbs": 1.0, "continue": 1.0, "turns_after": 1.0,
                                 "time_to_next": 1.0, "returned_1d": 1.0, "returned_7d": 1.0})
    use: Literal["recipe", "learned", "equal"] = Field("recipe", description="weights the RewardFn uses; "
                                                                            "learned = runs/<run>/reward/weights.json")
    kpi: Literal["returned_7d", "returned_1d", "continue", "thumbs"] = "returned_7d"
    safety: Literal["head", "none"] = Field("head", description="head: the safety head's constraint (a reward "
                                            "without one is refused); none: no safety constraint, said explicitly")
    safety_tau: float = Field(0.9, ge=0, le=1, description="safety score (1 - p_report) below tau: reward = -K")
    hard_penalty: float = Field(10.0, gt=0, description="K: a flagged reply's reward")
    floor_margin: float = Field(1.0, gt=0, description="an unflagged reply scores at least -K + margin, so the "
                                                        "flagged -K is below every unflagged reply")
    lagrangian: bool = True
    unsafe_budget: float = Field(0.01, ge=0, le=1, description="allowed mean p_unsafe per batch")
    dual_lr: float = Field(1.0, gt=0, description="dual ascent step on the multiplier")
    lambda_init: float = Field(0.0, ge=0)
    lambda_max: float = Field(100.0, gt=0)
    norm_rows: int = Field(3000, ge=10, description="training rows the normalisation stats come from")

    @model_validator(mode="after")
    def _known(self) -> CombineSection:
        unknown = sorted(set(self.weights) - set(HEADS) - {"safety"})
        if unknown:
            raise ValueError(f"unknown components in combine.weights: {unknown} (known: {', '.join(HEADS)})")
        if "safety" in self.weights:
            raise ValueError("safety is a constraint (safety_tau, lagrangian), not a weighted component")
        return self


def check_safety_head(heads: list[str], combine: CombineSection, heads_key: str, combine_key: str) -> None:
    """A ValueError when the heads trained for a combined reward hold no safety head and `combine`
    does not opt out: such a reward would run with no safety constraint and no warning."""
    if "safety" not in heads and combine.safety != "none":
        raise ValueError(f"{heads_key} has no safety head, so the combined reward would have no safety constraint: "
                         f'add "safety" to {heads_key} or set {combine_key}.safety = "none"')


class RMRecipe(Section):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    backbone: BackboneSection = BackboneSection()
    train: HeadTrainSection = HeadTrainSection()
    eval: EvalSection = EvalSection()
    combine: CombineSection = CombineSection()

    def build_dir(self) -> Path:
        return Path(self.data.build)

    @model_validator(mode="after")
    def _safety_head(self) -> RMRecipe:
        check_safety_head(self.data.heads, self.combine, "data.heads", "combine")
        return self
