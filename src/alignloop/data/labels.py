"""Derived labels: what happened after each selected assistant turn, computed from the logs alone.

One row per selected assistant turn (schema `LABELS`). Outcomes the log window cannot show are
null, not False: no reply is null time-to-next; a return horizon running past the end of the log
(`observed_until`, by default the last event) with no return seen is null (censored).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import polars as pl
import pyarrow as pa

from alignloop.data.schema import conform

DAY_MS = 86_400_000


def derive_labels(tables: Mapping[str, pa.Table], observed_until: datetime | None = None) -> pa.Table:
    """The labels table for log tables `turns`, `conversations`, `sessions` (and `events` for the window end)."""
    turns = pl.from_arrow(tables["turns"]).lazy()
    conversations = pl.from_arrow(tables["conversations"]).lazy().select("conversation_id", "user_id")
    sessions = pl.from_arrow(tables["sessions"]).lazy()
    if observed_until is None:
        events = pl.from_arrow(tables["events"].select(["timestamp"]))
        ends = [events["timestamp"].max(), pl.from_arrow(tables["sessions"].select(["ended_at"]))["ended_at"].max()]
        ends = [e for e in ends if e is not None]
        observed_until = max(ends) if ends else None
    until_ms = None if observed_until is None else int(observed_until.timestamp() * 1000)

    ms = pl.col("created_at").dt.epoch("ms")
    assistant = (turns.filter((pl.col("role") == "assistant") & pl.col("selected"))
                 .select("turn_id", "conversation_id", "position", t=ms))
    users_turns = turns.filter(pl.col("role") == "user")
    replies = (users_turns.filter(pl.col("parent_id").is_not_null())
               .group_by("parent_id").agg(reply_t=ms.min()))
    # turns_after = user turns in the conversation minus those no deeper than this turn; an as-of
    # join on depth finds the latter without pairing every turn with every other.
    user_depths = (users_turns.select("conversation_id", "position")
                   .sort("conversation_id", "position")
                   .with_columns(upto=pl.int_range(1, pl.len() + 1).over("conversation_id"),
                                 total=pl.len().over("conversation_id"))
                   .sort("position"))
    after = (assistant.select("turn_id", "conversation_id", "position").sort("position")
             .join_asof(user_depths, on="position", by="conversation_id", strategy="backward",
                        check_sortedness=False)
             .select("turn_id", turns_after=pl.col("total") - pl.col("upto")))

    labelled = (assistant.join(conversations, on="conversation_id", how="left")
                .join(replies, left_on="turn_id", right_on="parent_id", how="left")
                .join(after, on="turn_id", how="left")
                .with_columns(turns_after=pl.col("turns_after").fill_null(0))
                .sort("t"))
    starts = (sessions.select("user_id", start=pl.col("started_at").dt.epoch("ms"))
              .sort("start"))
    # The first session of the same user that starts strictly after the turn.
    labelled = labelled.join_asof(starts, left_on="t", right_on="start", by="user_id", strategy="forward",
                                  allow_exact_matches=False, check_sortedness=False)
    gap = pl.col("start") - pl.col("t")

    def returned(days: int) -> pl.Expr:
        seen = pl.col("start").is_not_null() & (gap <= days * DAY_MS)
        if until_ms is None:
            return seen
        return pl.when(seen).then(True).when(pl.col("t") + days * DAY_MS > until_ms).then(None).otherwise(False)

    out = labelled.select(
        "turn_id", "conversation_id", "user_id",
        continued=pl.col("reply_t").is_not_null(),
        turns_after=pl.col("turns_after").cast(pl.Int32),
        time_to_next_user_message=(pl.col("reply_t") - pl.col("t")).cast(pl.Float64) / 1000.0,
        returned_1d=returned(1),
        returned_7d=returned(7),
    ).collect()
    return conform("labels", out.to_arrow())
