"""The per-user influence cap: conversations beyond a user's cap are dropped or down-weighted."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from alignloop.data.filters.base import Filter, Frames, drop_conversations
from alignloop.data.stablehash import hash_column
from alignloop.recipes import Section


class UserCapConfig(Section):
    """Per-user influence cap: drop (or down-weight) conversations beyond the cap."""

    enabled: bool = True
    max_conversations: int | None = Field(50, ge=1)
    max_examples: int | None = Field(None, ge=1, description="selected assistant turns per user")
    mode: Literal["drop", "weight"] = "drop"
    salt: str = "user_cap"



class UserCapFilter(Filter):
    name = "user_cap"
    unit = "conversations"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: UserCapConfig = self.config
        examples = (frames["turns"].filter((pl.col("role") == "assistant") & pl.col("selected"))
                    .group_by("conversation_id").agg(n_examples=pl.len()))
        convs = (frames["conversations"].select("conversation_id", "user_id")
                 .join(examples, on="conversation_id", how="left")
                 .with_columns(pl.col("n_examples").fill_null(0)))
        return convs.with_columns(h=hash_column(convs, "conversation_id", c.salt))

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        c: UserCapConfig = self.config
        s = signature.sort("user_id", "h").with_columns(
            rank=pl.int_range(pl.len()).over("user_id"),
            cum=pl.col("n_examples").cum_sum().over("user_id"),
            n_convs=pl.len().over("user_id"),
            n_ex=pl.col("n_examples").sum().over("user_id"))
        if c.mode == "drop":
            over_c = pl.col("rank") >= c.max_conversations if c.max_conversations else pl.lit(False)
            over_e = pl.col("cum") > c.max_examples if c.max_examples else pl.lit(False)
            reason = (pl.when(over_c).then(pl.lit("over_conversation_cap"))
                      .otherwise(pl.lit("over_example_cap")))
            return (s.filter(over_c | over_e)
                    .select(id="conversation_id", user_id="user_id", reason=reason, weight=pl.lit(None, pl.Float64)))
        w = pl.lit(1.0)
        if c.max_conversations:
            w = pl.min_horizontal(w, c.max_conversations / pl.col("n_convs"))
        if c.max_examples:
            w = pl.min_horizontal(w, c.max_examples / pl.col("n_ex").cast(pl.Float64))
        return (s.with_columns(weight=w).filter(pl.col("weight") < 1.0)
                .select(id="conversation_id", user_id="user_id", reason=pl.lit("down_weighted"), weight="weight"))

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        if self.config.mode == "drop":
            return drop_conversations(frames, decisions.select(conversation_id="id"))
        if decisions.height == 0:
            return frames
        new = decisions.select(conversation_id="id", factor="weight")
        weights = (frames["weights"].join(new, on="conversation_id", how="left", maintain_order="left")
                   .with_columns(weight=pl.col("weight") * pl.col("factor").fill_null(1.0)).drop("factor"))
        return {**frames, "weights": weights}
