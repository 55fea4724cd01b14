"""The quality filter: selected assistant turns unfit to imitate (empty, truncated, unsafe,
repetitive) are flagged as non-targets; they stay in the logs as context and rejected answers.

Each rule judges only the answers it can judge (`applies_to`): "truncated" means a model's answer
was cut at its token limit, a failure people do not have. A person's message that ends without a
full stop ("ok cool", "haha") is how people chat, so by default the rule leaves people's answers
alone. Who wrote an answer comes from its conversation's `model_version`: one starting with a
`human_sources` prefix (adapters of human conversations write "human:<dataset>") was written by a
person; anything else by a model. The turns a rule left alone are counted in the funnel
(`out_of_scope`), so a rule that cannot see most of the logs says so.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
from typing import Any, Literal

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
RULES: tuple[str, ...] = ("empty", "truncated", "unsafe", "repetitive", "repeats_earlier_turn")
"""The rules, in the order they are tried: an answer carries the first reason that fires."""
HUMAN_SOURCES = ["human:"]

Author = Literal["all", "model", "human"]


class RuleScope(Section):
    """`[filter.quality.applies_to]`: whose answers each rule judges: "model" (model_version not a
    human source), "human", or "all"."""

    empty: Author = "all"
    truncated: Author = Field("model", description="a cut at the token limit is a model's failure, not a person's")
    unsafe: Author = "all"
    repetitive: Author = "all"
    repeats_earlier_turn: Author = "all"


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
    human_sources: list[str] = Field(default_factory=lambda: list(HUMAN_SOURCES),
                                     description="model_version prefixes that mark answers written by people")
    applies_to: RuleScope = RuleScope()


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

    def _with_human(self, frames: Frames, df: pl.DataFrame) -> pl.DataFrame:
        """`df` (with conversation_id) plus `human`: whether people wrote its assistant turns (see
        the module doc). Logs with no human conversation (a simulated world) skip the join."""
        prefixes = [p for p in self.config.human_sources if p]
        if prefixes:
            human = pl.any_horizontal([pl.col("model_version").str.starts_with(p) for p in prefixes])
            convs = frames["conversations"].select("conversation_id", human=human).filter(pl.col("human"))
            if convs.height:
                return df.with_columns(human=pl.col("conversation_id").is_in(convs["conversation_id"].implode()))
        return df.with_columns(human=pl.lit(False))

    def _in_scope(self, rule: str) -> pl.Expr:
        scope = getattr(self.config.applies_to, rule)
        return pl.lit(True) if scope == "all" else ~pl.col("human") if scope == "model" else pl.col("human")

    def _active(self) -> list[str]:
        """The rules that can fire with this config (a switched-off rule has no scope to report)."""
        c: QualityConfig = self.config
        off = {"empty": c.min_chars == 0, "truncated": not c.check_truncated,
               "unsafe": not any(w.strip() for w in c.unsafe_words), "repeats_earlier_turn": c.history == 0}
        return [r for r in RULES if not off.get(r, False)]

    def out_of_scope(self, frames: Frames) -> dict[str, int]:
        """Per rule: the targets it left unjudged, their author being outside its `applies_to`."""
        rules = [r for r in self._active() if getattr(self.config.applies_to, r) != "all"]
        if not rules:
            return {}
        a = self._with_human(frames, self._targets(frames).select("conversation_id"))
        counts = a.select(**{r: (~self._in_scope(r)).sum() for r in rules}).row(0, named=True)
        return {r: int(n) for r, n in counts.items()}

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: QualityConfig = self.config
        targets = (self._targets(frames)
                   .select("turn_id", "conversation_id", "position", stripped=pl.col("text").str.strip_chars())
                   .with_columns(lower=pl.col("stripped").str.to_lowercase()))
        a = self._with_human(frames, targets)
        a = a.with_columns(
            empty=pl.col("stripped").str.len_chars() < c.min_chars,
            ends_well=pl.col("stripped").str.contains(c.end_pattern),
            n_unsafe=self._unsafe(pl.col("lower")),
        )
        within, across = self._repetition(a, c)
        a = a.with_columns(within=pl.Series(within), across=pl.Series(across))
        fires = {"empty": pl.col("empty"), "truncated": pl.lit(c.check_truncated) & ~pl.col("ends_well"),
                 "unsafe": pl.col("n_unsafe") > c.max_unsafe, "repetitive": pl.col("within") > c.max_repeat_within,
                 "repeats_earlier_turn": pl.col("across") > c.max_repeat_across}
        chain: Any = pl
        for rule in RULES:
            chain = chain.when(fires[rule] & self._in_scope(rule)).then(pl.lit(rule))
        reason = chain.otherwise(None)
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
