"""The bot filter: users who replay the same messages, reply faster or more regularly than a
person types, or pick without reading."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from alignloop.data.filters.base import (
    Filter,
    Frames,
    conv_user,
    drop_users,
    read_stats,
)
from alignloop.recipes import Section


class BotConfig(Section):
    """Bot-like users: a user is dropped when at least `min_signals` of these fire."""

    enabled: bool = True
    min_signals: int = Field(2, ge=1)
    need_one_of: list[Literal["repeats", "fast", "regular", "no_read"]] = Field(
        default_factory=lambda: ["repeats", "fast"],
        description="signals of which one must fire (people who skim and reply regularly are not bots)")
    min_messages: int = Field(6, ge=1, description="messages needed to judge repetition")
    max_duplicate_share: float = Field(0.5, ge=0, le=1, description="repeats: share of messages seen before")
    min_replies: int = Field(3, ge=1, description="timed replies needed to judge speed")
    min_median_reply_seconds: float = Field(4.0, ge=0, description="fast: median reply time below this")
    min_regular_replies: int = Field(8, ge=2, description="timed replies needed to judge regularity")
    max_reply_cv: float = Field(0.3, ge=0, description="regular: reply times vary less than this (std/mean)")
    min_reads: int = Field(3, ge=1)
    min_read_seconds: float = Field(0.5, ge=0)
    max_words_per_second: float = Field(25.0, gt=0)
    max_unread_share: float = Field(0.5, ge=0, le=1, description="no_read: share of ~0 s reads at least this")



class BotFilter(Filter):
    name = "bots"
    unit = "users"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: BotConfig = self.config
        msgs = (frames["turns"].filter(pl.col("role") == "user")
                .join(conv_user(frames), on="conversation_id", how="inner")
                .select("user_id", norm=pl.col("text").str.to_lowercase().str.strip_chars().hash(seed=5)))
        repeats = msgs.group_by("user_id").agg(
            n_messages=pl.len(), dup_share=1.0 - pl.col("norm").n_unique() / pl.len())
        ms = pl.col("timestamp").dt.epoch("ms")
        conv = pl.col("conv")
        gaps = (frames["events"].select("user_id", "type", conv=pl.col("conversation_id").hash(seed=5), ms=ms)
                .sort("conv", "ms")
                .with_columns(gap=pl.when(conv == conv.shift(1)).then((pl.col("ms") - pl.col("ms").shift(1)) / 1000.0))
                .filter((pl.col("type") == "message") & pl.col("gap").is_not_null())
                .group_by("user_id")
                .agg(n_replies=pl.len(), median_reply=pl.col("gap").median(),
                     reply_cv=pl.col("gap").std() / pl.col("gap").mean()))
        reads = read_stats(frames, c.min_read_seconds, c.max_words_per_second)
        return (frames["users"].select("user_id")
                .join(repeats, on="user_id", how="left")
                .join(gaps, on="user_id", how="left")
                .join(reads, on="user_id", how="left")
                .with_columns(pl.col("n_messages", "n_replies", "n_reads").fill_null(0)))

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        c: BotConfig = self.config
        signals = {
            "repeats": (pl.col("n_messages") >= c.min_messages) & (pl.col("dup_share") >= c.max_duplicate_share),
            "fast": (pl.col("n_replies") >= c.min_replies) & (pl.col("median_reply") < c.min_median_reply_seconds),
            "regular": (pl.col("n_replies") >= c.min_regular_replies) & (pl.col("reply_cv") < c.max_reply_cv),
            "no_read": (pl.col("n_reads") >= c.min_reads) & (pl.col("unread_share") >= c.max_unread_share),
        }
        fired = signature.select("user_id", **{k: v.fill_null(False) for k, v in signals.items()})
        count = pl.sum_horizontal(*(pl.col(k).cast(pl.Int32) for k in signals))
        reason = pl.concat_str([pl.when(pl.col(k)).then(pl.lit(k)) for k in signals], separator="+", ignore_nulls=True)
        strong = pl.any_horizontal(*(pl.col(k) for k in c.need_one_of)) if c.need_one_of else pl.lit(True)
        return (fired.filter((count >= c.min_signals) & strong)
                .select(id="user_id", user_id="user_id", reason=pl.lit("bot:") + reason)
                .sort("id"))

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        return drop_users(frames, decisions)
