"""What a dataset build makes: the datasets' Arrow schemas (every example's messages in the chat
layer's format) and the `[build]` recipe section that chooses them (`BuildConfig`).

`builders` turns filtered logs into rows of these schemas; `dataset_writer` writes them.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import Field

from alignloop.data.schema import doc_field
from alignloop.recipes import Section

Signal = Literal["preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d", "returned_7d",
                 "safety"]
SIGNALS: tuple[str, ...] = ("preference", "thumbs", "continue", "turns_after", "time_to_next", "returned_1d",
                            "returned_7d", "safety")


# --- schemas -----------------------------------------------------------------------------------

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

_ID = doc_field("example_id", pa.string(), "unique example id")
_USER = doc_field("user_id", pa.string(), "the user whose behaviour produced it")
_CONV = doc_field("conversation_id", pa.string(), "its conversation")
_WEIGHT = doc_field("weight", pa.float64(), "training weight (per-user cap), 1 = full")

SFT = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the target: the assistant turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("source", pa.string(), "swipe (settled on after swiping) or selected (accepted as shown)"),
    doc_field("messages", MESSAGES, "system, context, and the target assistant message last"),
    _WEIGHT,
])
PAIRS = pa.schema([
    _ID, _USER, _CONV,
    doc_field("parent_id", pa.string(), "the user turn both answer"),
    doc_field("chosen_turn_id", pa.string(), "the candidate the user settled on"),
    doc_field("rejected_turn_id", pa.string(), "a shown sibling the user swiped away"),
    doc_field("prompt", MESSAGES, "system and context, ending with the user turn"),
    doc_field("chosen", MESSAGES, "[the chosen assistant message]"),
    doc_field("rejected", MESSAGES, "[the rejected assistant message]"),
    _WEIGHT,
])
SCALAR = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the assistant turn scored"),
    doc_field("messages", MESSAGES, "system, context, and the scored assistant message last"),
    doc_field("label", pa.float64(), "the signal's value; null when censored", nullable=True),
    doc_field("censored", pa.bool_(), "the outcome was not observed (time_to_next: the user never replied)"),
    _WEIGHT,
])
DISTILL = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the user turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("messages", MESSAGES, "system and context, ending with the user turn"),
    _WEIGHT,
])
RL = pa.schema([
    _ID, _USER, _CONV,
    doc_field("turn_id", pa.string(), "the user turn ending `messages`"),
    doc_field("character_id", pa.string(), "the character"),
    doc_field("messages", MESSAGES, "system and context, ending with the user turn: what the policy answers"),
    _WEIGHT,
])
DATASET_SCHEMAS: dict[str, pa.Schema] = {"sft": SFT, "dpo": PAIRS, "distill": DISTILL, "rl": RL,
                                         **{f"rm/{s}": PAIRS if s == "preference" else SCALAR for s in SIGNALS}}


# --- configuration -----------------------------------------------------------------------------


class SFTBuild(Section):
    """`[build.sft]`: which answers become supervised examples."""

    enabled: bool = True
    source: Literal["auto", "swipes", "selected"] = Field(
        "auto", description="swipes: answers settled on after swiping; selected: every selected answer; "
                            "auto: swipes when the logs have any, else selected")


class DPOBuild(Section):
    """`[build.dpo]`: chosen/rejected pairs from swiped-away siblings."""

    enabled: bool = True
    max_pairs_per_prompt: int | None = Field(None, ge=1, description="rejected siblings per chosen, lowest index first")
    require_swipe_event: bool = Field(False, description="rejected only if a swipe event on it survived filtering")


class RMBuild(Section):
    """`[build.rm]`: reward-model sets, one per signal, split by user into train and eval."""

    enabled: bool = True
    signals: list[Signal] = Field(default_factory=lambda: list(SIGNALS))
    eval_fraction: float = Field(0.1, ge=0, le=1, description="share of users in eval")
    salt: str = Field("rm-split", description="changes which users land in eval")
    safety_negatives_per_positive: float | None = Field(
        None, gt=0, description="keep at most this many unreported answers per reported one")


class DistillBuild(Section):
    """`[build.distill]`: prompts for a teacher to answer."""

    enabled: bool = True
    dedup: bool = Field(True, description="one prompt per distinct messages")
    max_prompts: int | None = Field(None, ge=1)


class RLBuild(Section):
    """`[build.rl]`: prompts for RL, split by user with the reward models' split (`build.rm.salt`,
    `build.rm.eval_fraction`): one split for both, so no RL prompt comes from a held-out user."""

    enabled: bool = True
    dedup: bool = Field(True, description="one prompt per distinct messages, over both splits (a text is in one)")
    max_prompts: int | None = Field(None, ge=1, description="per split, a stable hash sample")
    max_context_messages: int | None = Field(None, ge=1, description="messages of a prompt, the user turn "
                                             "included, at most; none: the build's max_context_messages")


class BuildConfig(Section):
    """`[build]`: how the datasets are built from filtered logs, and which."""

    max_context_messages: int | None = Field(20, ge=1, description="messages before the example's point, at most")
    use_edits: bool = Field(True, description="context shows answers as the user rewrote them")
    include_system: bool = True
    formats: list[Literal["parquet", "jsonl"]] = Field(default_factory=lambda: ["parquet"])
    partitions: int = Field(1, ge=1, description="user partitions built one at a time (unpartitioned input)")
    events_per_partition: int = Field(400_000, ge=1, description="bigger partitions are cut further in memory")
    sft: SFTBuild = SFTBuild()
    dpo: DPOBuild = DPOBuild()
    rm: RMBuild = RMBuild()
    distill: DistillBuild = DistillBuild()
    rl: RLBuild = RLBuild()
