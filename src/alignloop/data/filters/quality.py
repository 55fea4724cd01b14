"""The quality filter: selected assistant turns unfit to imitate (empty, truncated, unsafe,
repetitive) are flagged as non-targets; they stay in the logs as context and rejected answers."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
from pydantic import Field

from alignloop.data.filters.base import Filter, Frames, conv_user
from alignloop.recipes import Section

# A small lexicon of words that make an assistant answer unfit to imitate (insults, violence, drugs).
DEFAULT_UNSAFE = [
    "kill", "killing", "murder", "hate", "stupid", "idiot", "moron", "dumb", "worthless", "loser", "weapon",
    "weapons", "bomb", "gun", "drugs", "cocaine", "heroin", "hurt", "suicide", "die",
]
EDGE_CHARS = " \t\n\"'*,;:()[]~-"
SENTENCE_BREAK = r"[.!?]+|\*[^*\n]{1,40}\*"  # sentence ends, and *gestures* between sentences
ENDS_WELL = r"[.!?…\"'”’)\]*~>]$|[\p{So}\p{Sk}]$"


class QualityConfig(Section):
    """Assistant turns unfit to imitate: flagged as non-targets (kept as context and rejected answers)."""

    enabled: bool = True
    min_chars: int = Field(1, ge=0, description="shorter (after stripping) is empty")
    check_truncated: bool = True
    end_pattern: str = Field(ENDS_WELL, description="regex a complete answer ends with")
    unsafe_words: list[str] = Field(default_factory=lambda: list(DEFAULT_UNSAFE))
    max_unsafe: int = Field(0, ge=0, description="unsafe words allowed")
    min_sentence_chars: int = Field(8, ge=1, description="shorter sentences are not checked for repetition")
    max_repeat_within: float = Field(0.0, ge=0, le=1, description="share of a turn's sentences that may repeat")
    max_repeat_across: float = Field(0.5, ge=0, le=1,
                                     description="share of its sentences that may come from the previous turns")
    history: int = Field(3, ge=0, description="previous selected assistant turns to compare with")



class QualityFilter(Filter):
    name = "quality"
    unit = "targets"

    def items(self, frames: Frames) -> pl.DataFrame:
        return (self._targets(frames).select(id="turn_id", cid="conversation_id")
                .join(conv_user(frames), left_on="cid", right_on="conversation_id", how="left")
                .select("id", "user_id"))

    @staticmethod
    def _targets(frames: Frames) -> pl.DataFrame:
        """Only selected assistant turns can be training targets, so only they are judged."""
        return frames["turns"].filter((pl.col("role") == "assistant") & pl.col("selected"))

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: QualityConfig = self.config
        a = (self._targets(frames)
             .select("turn_id", "conversation_id", "position", stripped=pl.col("text").str.strip_chars())
             .with_columns(lower=pl.col("stripped").str.to_lowercase()))
        a = a.with_columns(
            empty=pl.col("stripped").str.len_chars() < c.min_chars,
            ends_well=pl.col("stripped").str.contains(c.end_pattern),
            n_unsafe=self._unsafe(pl.col("lower")),
        )
        within, across = self._repetition(a, c)
        a = a.with_columns(within=pl.Series(within), across=pl.Series(across))
        reason = (pl.when(pl.col("empty")).then(pl.lit("empty"))
                  .when(pl.lit(c.check_truncated) & ~pl.col("ends_well")).then(pl.lit("truncated"))
                  .when(pl.col("n_unsafe") > c.max_unsafe).then(pl.lit("unsafe"))
                  .when(pl.col("within") > c.max_repeat_within).then(pl.lit("repetitive"))
                  .when(pl.col("across") > c.max_repeat_across).then(pl.lit("repeats_earlier_turn"))
                  .otherwise(None))
        flagged = a.select("turn_id", "conversation_id", reason=reason).filter(pl.col("reason").is_not_null())
        return (flagged.join(conv_user(frames), on="conversation_id", how="left")
                .select(id="turn_id", user_id="user_id", reason="reason", conversation_id="conversation_id"))

    @staticmethod
    def _repetition(a: pl.DataFrame, c: QualityConfig) -> tuple[np.ndarray, np.ndarray]:
        """Per turn of `a` (selected assistant turns): share of its sentences repeated inside it, and
        share of its distinct sentences said in the `history` selected assistant turns before it.

        Long form, one row per sentence, sorted by (conversation, sentence, depth): a copy inside
        the same turn follows at the same depth, an earlier saying at a smaller one. No joins.
        """
        long = (a.select(tid=pl.int_range(pl.len(), dtype=pl.Int64), conv=pl.col("conversation_id").hash(seed=3),
                         pos="position", s=pl.col("lower").str.replace_all(SENTENCE_BREAK, "\x00").str.split("\x00"))
                .explode("s")
                .with_columns(pl.col("s").str.strip_chars(EDGE_CHARS))
                .filter(pl.col("s").str.len_chars() >= c.min_sentence_chars)
                .select("tid", "conv", "pos", h=pl.col("s").hash(seed=11))
                .sort("conv", "h", "pos"))
        n = a.height
        tid = long["tid"].to_numpy()
        conv, h, pos = long["conv"].to_numpy(), long["h"].to_numpy(), long["pos"].to_numpy()
        same = np.zeros(len(tid), dtype=bool)
        same[1:] = (conv[1:] == conv[:-1]) & (h[1:] == h[:-1])
        prev = np.r_[np.int64(-1), pos[:-1]]
        copy = same & (prev == pos)
        said = same & (prev < pos) & (prev >= pos - 2 * c.history)
        total = np.bincount(tid, minlength=n).astype(np.float64)
        dups = np.bincount(tid, weights=copy, minlength=n)
        common = np.bincount(tid, weights=said, minlength=n)
        distinct = total - dups
        within = np.divide(dups, total, out=np.zeros(n), where=total > 0)
        across = np.divide(common, distinct, out=np.zeros(n), where=distinct > 0)
        return within, across

    def _unsafe(self, text: pl.Expr) -> pl.Expr:
        lexicon = sorted({w.lower() for w in self.config.unsafe_words if w.strip()})
        if not lexicon:
            return pl.lit(0, pl.UInt32)
        # On lowercased text: a case-insensitive regex is many times slower.
        pattern = r"\b(?:" + "|".join(re.escape(w) for w in lexicon) + r")\b"
        return text.str.count_matches(pattern)

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        return signature

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        if decisions.height == 0:
            return frames
        mine = decisions.join(frames["turns"].select(id="turn_id"), on="id", how="semi")
        new = mine.select(turn_id="id", conversation_id="conversation_id", reason="reason")
        flags = pl.concat([frames["target_flags"], new.cast(frames["target_flags"].schema)])
        return {**frames, "target_flags": flags.unique("turn_id", keep="first", maintain_order=True)}
