"""The trainers' recipes: `SFTRecipe`, `DPORecipe`, `DistillRecipe`, and the sections they share.

`TrainSection` holds what every trainer shares (the optimizer, the schedule, batching, LoRA,
checkpoints, trackers); SFT, DPO and distillation each extend it with their own keys. The loop
reads only what is in `TrainSection` (`parallel` included: every trainer runs under torchrun
alike), so one loop serves all of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from alignloop.engine.config import SamplingSection
from alignloop.recipes import ExistingFile, Section
from alignloop.sections import ModelSection, RunSection
from alignloop.train.schedule import ScheduleKind

Tracker = Literal["tensorboard", "trackio"]


class LoraSection(Section):
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scale = alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="module names to adapt; all-linear = every Linear but the output head")


class MoESection(Section):
    """Expert balancing of MoE models (see `alignloop.train.moe_balance`); ignored by dense models."""

    bias_update_speed: float = Field(1e-3, ge=0, description="router-bias step gamma per optimizer step "
                                     "(DeepSeek-V3: 1e-3); 0 freezes the bias and only logs the load")
    # Default 0: V3 balances with the bias and keeps alpha tiny (1e-4) only to stop a single
    # sequence from piling onto a few experts. At 1e-4 the term is ~1e-4 beside a CE of 3-10 and
    # moves nothing measurable in a run of a few hundred steps, while it costs a hook and the
    # [B, T, E] scores' backward per MoE layer; set it (e.g. 1e-4) to study it.
    balance_loss: float = Field(0.0, ge=0, description="weight alpha of V3's sequence-wise balance loss "
                                "(V3: 1e-4); 0: off")


GradSync = Literal["correct", "none", "experts_too"]


class ParallelSection(Section):
    """How several processes (torchrun) share the work; a plain single-process run ignores it.

    `train.parallel = "ddp"` (or "fsdp") is shorthand for `{strategy = "ddp"}`. With `expert = e > 1`
    (MoE models, DDP only) each group of e consecutive ranks splits the routed experts e ways and
    sends tokens to their experts by all-to-all; every rank still sees its own share of the batch
    (see `alignloop.train.expert_parallel`).
    """

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="replicate the model (ddp) or shard it (fsdp, FSDP2)")
    expert: int = Field(1, ge=1, description="expert-parallel size: routed experts split this many ways "
                        "(must divide the number of processes and of routed experts); 1: off")
    capacity_factor: float | None = Field(
        None, gt=0, description="cap each expert at factor x its even share of a rank's routed tokens; "
        "the tokens over it skip their routed experts and are counted (ep/dropped); none: never drop")
    grad_sync: GradSync = Field(
        "correct", description="diagnostics only: 'none' skips every gradient reduction, 'experts_too' "
        "also averages expert gradients over all ranks (the two classic bugs)")
    check_replicas: bool = Field(False, description="log ep/replica_divergence every step: the largest "
                                 "relative difference of a replicated parameter from rank 0's (one broadcast)")

    @model_validator(mode="after")
    def _ep_needs_ddp(self) -> ParallelSection:
        if self.expert > 1 and self.strategy != "ddp":
            raise ValueError("expert parallelism shards the experts itself: use strategy = 'ddp' with expert > 1")
        return self

    @model_serializer(mode="wrap")
    def _as_shorthand(self, handler: Any) -> Any:
        # A run without expert parallelism dumps as the bare strategy, as before this section
        # existed, so the config hashes of existing runs (and their checkpoints) stay valid.
        data = handler(self)
        plain = {k: v for k, v in data.items() if k != "strategy"} == _PLAIN_REST
        return data["strategy"] if plain else data


_PLAIN_REST = {"expert": 1, "capacity_factor": None, "grad_sync": "correct", "check_replicas": False}


class TrainSection(Section):
    # optimizer (AdamW)
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global grad norm; none: no clipping")

    # schedule
    schedule: ScheduleKind = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="warmup as a fraction of all steps")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in steps; overrides warmup_ratio")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine ends at min_lr_ratio x lr")

    # length of the run: steps wins over epochs when both are set
    steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)

    # batching: one optimizer step = micro_batch x grad_accum rows (x processes)
    micro_batch: int = Field(4, ge=1, description="rows per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro batches per optimizer step")

    # precision and device
    bf16: bool = Field(True, description="bf16 autocast for matmuls; master weights and loss stay fp32")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # several processes (torchrun; see alignloop.train.dist): ignored in a plain single-process run
    parallel: ParallelSection = Field(
        ParallelSection(), description="under torchrun: 'ddp', 'fsdp', or a table with the expert-parallel size")

    # full fine-tuning (lora = false / absent) or LoRA
    lora: LoraSection | None = None

    # FP8: train against the rounding FP8 serving applies (see alignloop.fp8.qat)
    fp8: Literal["off", "qat", "torchao"] = Field(
        "off", description="qat: projections fake-quantised to e4m3 blocks in the forward (straight-through "
        "backward); torchao: FP8 GEMMs via torchao's Float8Linear (GPUs with FP8 only)")

    # MoE models only: router-bias balancing and load logging
    moe: MoESection = MoESection()

    # bookkeeping
    eval_every: int = Field(50, ge=0, description="eval loss every N steps (and at the end); 0: only at the end")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    track: list[Tracker] = Field(default_factory=list, description="also log metrics to these experiment "
                                 "trackers (optional extras: pip install 'alignloop[track]')")

    @field_validator("parallel", mode="before")
    @classmethod
    def _strategy_shorthand(cls, value: Any) -> Any:
        return {"strategy": value} if isinstance(value, str) else value

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_off(cls, value: Any) -> Any:
        # TOML has no null: `--set train.lora=false` (or "none") switches LoRA off.
        if value is False or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off", "")):
            return None
        return value

    @model_serializer(mode="wrap")
    def _without_unused_new_keys(self, handler: Any) -> Any:
        # Keys added after runs already exist are dumped only when set, so those runs' config
        # hashes (and checkpoints) stay valid.
        data = handler(self)
        if isinstance(data, dict) and data.get("fp8") == "off":
            data.pop("fp8")
        return data

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainSection:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_ratio * total_steps)


# --- SFT ----------------------------------------------------------------------------------------


class SFTDataSection(Section):
    path: ExistingFile = Field(description="JSONL or Parquet: one {'messages': [...], 'weight'?: x} per row")


class SFTTrainSection(TrainSection):
    max_seq_len: int = Field(2048, ge=8, description="tokens per packed row; longer conversations are skipped")
    packing: bool = Field(True, description="several conversations per row, isolated from each other")
    last_turn_only: bool = Field(False, description="loss on the final assistant turn only")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="conversations held out for eval loss")
    max_conversations: int | None = Field(None, ge=1, description="train on at most this many conversations, "
                                          "a seeded draw made before tokenizing (a short run on a big log)")


class SFTRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: SFTDataSection
    train: SFTTrainSection = SFTTrainSection()


# --- DPO ----------------------------------------------------------------------------------------

LossKind = Literal["dpo", "ipo", "simpo", "ld_dpo", "rdpo", "kto"]
_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "ld_dpo": 0.1, "rdpo": 0.1, "kto": 0.1}


class DPODataSection(Section):
    path: ExistingFile = Field(description="JSONL or Parquet pairs: prompt, chosen, rejected, weight?, user_id?; "
                                           "for loss = kto, labelled answers (see alignloop.train.kto_data)")


class DPOTrainSection(TrainSection):
    loss: LossKind = Field("dpo", description="dpo (sigmoid), ipo (squared), simpo (reference-free), ld_dpo "
                           "(length-desensitised), rdpo (length-regularised), kto (unpaired, labelled answers)")
    beta: float = Field(None, gt=0, description="reward scale; default 2.0 for simpo, else 0.1")  # type: ignore[assignment]
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    ld_alpha: float = Field(0.5, ge=0, le=1, description="ld_dpo: weight of the log-prob of the tokens past the "
                            "shorter side's length (1: dpo; 0: only the shared length counts)")
    length_alpha: float = Field(0.01, ge=0, description="rdpo: margin subtracted per token the chosen side is "
                                "longer than the rejected one (0: dpo)")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of a desirable answer's loss")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of an undesirable answer's loss")
    max_seq_len: int = Field(1024, ge=8, description="tokens of prompt + response per side; longer pairs are skipped")
    packing: bool = Field(True, description="several pairs per row (up to 2 x max_seq_len tokens), isolated")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of users (stable hash) held out")
    split_salt: str = Field("dpo-split", description="changes which users land in eval")
    max_train_pairs: int | None = Field(None, ge=1, description="train on at most this many pairs (a seeded draw); "
                                        "the reference pass covers only the pairs used")
    max_eval_pairs: int | None = Field(None, ge=1, description="held-out pairs scored at eval, at most")

    @model_validator(mode="before")
    @classmethod
    def _default_beta(cls, data: Any) -> Any:
        # The scale that suits a variant differs by an order of magnitude: default it per variant.
        if isinstance(data, dict) and data.get("beta") is None:
            data = {**data, "beta": _DEFAULT_BETA.get(data.get("loss", "dpo"), 0.1)}
        return data


class DPORecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DPODataSection
    train: DPOTrainSection = DPOTrainSection()


# --- distillation -------------------------------------------------------------------------------


class DistillDataSection(Section):
    path: ExistingFile = Field(description="JSONL or Parquet messages rows: prompts (ending with a user turn) "
                                           "or conversations (ending with the answer to distill on)")


class DistillSection(Section):
    level: Literal["sequence", "logit"] = Field("logit", description="sequence: SFT on teacher answers; "
                                                                     "logit: KL to the teacher's top-k")
    responses: Literal["teacher", "data"] = Field(
        "teacher", description="teacher: the teacher answers each prompt; data: the rows' own assistant turns")
    kl: Literal["forward", "reverse"] = Field("forward", description="forward: KL(teacher||student); "
                                                                     "reverse: KL(student||teacher)")
    top_k: int = Field(20, ge=1, description="teacher log-probs kept per token")
    tail: Literal["bucket", "renormalise"] = Field("bucket", description="mass outside the top k: one extra "
                                                                         "outcome, or dropped (renormalised)")
    temperature: float = Field(1.0, gt=0, description="divides both models' logits (logit level)")
    keep_truncated: bool = Field(False, description="keep teacher answers cut off at sampling.max_tokens")
    engine_dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    @model_validator(mode="after")
    def _sequence_needs_teacher(self) -> DistillSection:
        if self.level == "sequence" and self.responses == "data":
            raise ValueError("sequence-level distillation trains on the teacher's answers: set "
                             "distill.responses = 'teacher' (or use `alignloop train sft` on the data)")
        return self


class DistillTrainSection(SFTTrainSection):
    last_turn_only: bool = Field(True, description="loss on the final assistant turn only (the distilled answer)")


class DistillRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()   # the student
    teacher: ModelSection
    data: DistillDataSection
    distill: DistillSection = DistillSection()
    sampling: SamplingSection = SamplingSection()  # how the teacher answers
    train: DistillTrainSection = DistillTrainSection()
