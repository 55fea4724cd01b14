"""The repeat filter: conversations whose user messages repeat other conversations exactly or
nearly (MinHash over word shingles, LSH groups); at most `max_copies` of each group stay."""

from __future__ import annotations

import polars as pl
from pydantic import Field, model_validator

from alignloop.data.filters.base import Filter, Frames, drop_conversations, no_decisions
from alignloop.data.neardup import lsh_groups, minhash, normalize, shingles
from alignloop.recipes import Section


class RepeatConfig(Section):
    """Over-repeated conversations: near-duplicate user messages (MinHash over word shingles)."""

    enabled: bool = True
    max_copies: int = Field(2, ge=1, description="conversations kept per near-duplicate group")
    min_words: int = Field(20, ge=1, description="shorter conversations (user words) are never repeats")
    num_perm: int = Field(64, ge=4)
    rows: int = Field(4, ge=1, description="MinHash values per LSH band")
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity to join a group")
    seed: int = 0

    @model_validator(mode="after")
    def _bands(self) -> RepeatConfig:
        if self.num_perm % self.rows:
            raise ValueError("num_perm must be a multiple of rows")
        return self



class RepeatFilter(Filter):
    name = "repeats"
    unit = "conversations"
    scope = "global"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: RepeatConfig = self.config
        convs = frames["conversations"].select("conversation_id", "user_id", "started_at")
        text = (frames["turns"].filter(pl.col("role") == "user")
                .sort("conversation_id", "position", "candidate_index")
                .group_by("conversation_id", maintain_order=True)
                .agg(text=pl.col("text").str.join("\n")))
        # Only conversations long enough to judge get a signature (shorter ones are never repeats).
        docs = (convs.join(text, on="conversation_id", how="inner")
                .with_columns(norm=normalize(pl.col("text")))
                .with_columns(n_words=pl.col("norm").str.count_matches(" ", literal=True) + 1)
                .filter(pl.col("n_words") >= c.min_words)
                .with_columns(doc=pl.int_range(pl.len(), dtype=pl.Int64), exact=pl.col("norm").hash(seed=c.seed)))
        d, words, pairs = shingles(docs.select("doc", "norm"), text="norm", normalized=True)
        sig = minhash(d, words, pairs, docs.height, c.num_perm, c.seed)
        return docs.select("conversation_id", "user_id", "started_at", "n_words", "exact").with_columns(
            pl.Series("sig", sig, dtype=pl.Array(pl.UInt64, c.num_perm)))

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        c: RepeatConfig = self.config
        s = signature.sort("started_at", "conversation_id")
        if s.height == 0:
            return no_decisions()
        sig = s["sig"].to_numpy().reshape(s.height, c.num_perm)
        eligible = (s["n_words"] >= c.min_words).to_numpy()
        group = lsh_groups(sig, c.rows, c.threshold, None if eligible.all() else eligible)
        s = s.with_columns(group=pl.Series(group), order=pl.int_range(pl.len()))
        s = s.with_columns(rank=pl.col("order").rank("ordinal").over("group") - 1,
                           first_exact=pl.col("order").rank("ordinal").over("group", "exact") == 1)
        dropped = s.filter(pl.col("rank") >= c.max_copies)
        return dropped.select(id="conversation_id", user_id="user_id",
                              reason=pl.when(pl.col("first_exact")).then(pl.lit("near_repeat"))
                              .otherwise(pl.lit("exact_repeat")))

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        return drop_conversations(frames, decisions.select(conversation_id="id"))
