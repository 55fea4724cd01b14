"""The minimum-reading filter: skimmers (most reads ~0 s) keep their conversations, but their
picks, swipes, thumbs and reads are dropped as preference signal."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field

from alignloop.data.filters.base import Filter, Frames, read_stats
from alignloop.recipes import Section

PREFERENCE_EVENTS = ["select", "swipe", "vote", "read"]


class MinReadingConfig(Section):
    """Skimmers: their selections carry no preference, so their preference events are dropped."""

    enabled: bool = True
    min_reads: int = Field(1, ge=1, description="reads needed to judge a user")
    min_read_seconds: float = Field(0.5, ge=0, description="a read shorter than this was not a read")
    max_words_per_second: float = Field(25.0, gt=0, description="nor was one faster than this")
    max_unread_share: float = Field(0.5, ge=0, le=1, description="a skimmer's share of such reads")
    drop_events: list[Literal["message", "read", "swipe", "select", "vote", "edit", "report"]] = Field(
        default_factory=lambda: list(PREFERENCE_EVENTS))



class MinReadingFilter(Filter):
    name = "min_reading"
    unit = "users"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: MinReadingConfig = self.config
        return (frames["users"].select("user_id")
                .join(read_stats(frames, c.min_read_seconds, c.max_words_per_second), on="user_id", how="left")
                .with_columns(pl.col("n_reads").fill_null(0)))

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        c: MinReadingConfig = self.config
        skim = (pl.col("n_reads") >= c.min_reads) & (pl.col("unread_share") >= c.max_unread_share)
        return (signature.filter(skim.fill_null(False))
                .select(id="user_id", user_id="user_id", reason=pl.lit("skimmer"))
                .sort("id"))

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        if decisions.height == 0:
            return frames
        c: MinReadingConfig = self.config
        users = decisions.select("user_id").unique()
        events = frames["events"]
        hit = events.join(users, on="user_id", how="semi").filter(pl.col("type").is_in(c.drop_events))
        return {**frames, "events": events.join(hit.select("event_id"), on="event_id", how="anti")}
