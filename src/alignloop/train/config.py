"""Recipe sections every trainer shares: the optimizer, the schedule, batching, LoRA, checkpoints.

SFT, DPO and distillation each extend `TrainSection` with their own keys; the loop reads only
what is here (`parallel` included: every trainer runs under torchrun alike), so one loop serves
all of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignloop.recipes import Section
from alignloop.train.schedule import ScheduleKind


class LoraSection(Section):
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scale = alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="module names to adapt; all-linear = every Linear but the output head")


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
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: replicate the model (ddp) or shard it (fsdp, FSDP2)")

    # full fine-tuning (lora = false / absent) or LoRA
    lora: LoraSection | None = None

    # bookkeeping
    eval_every: int = Field(50, ge=0, description="eval loss every N steps (and at the end); 0: only at the end")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_off(cls, value: Any) -> Any:
        # TOML has no null: `--set train.lora=false` (or "none") switches LoRA off.
        if value is False or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off", "")):
            return None
        return value

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainSection:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_ratio * total_steps)
