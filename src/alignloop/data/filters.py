"""Filters: named, configurable stages that clean user logs before datasets are built from them.

Each filter decides about one kind of item and says why it drops each one:

    quality       targets           empty, truncated, unsafe (a small lexicon), repetitive (a sentence
                                    said twice, or most of it said in the previous turns): such turns
                                    stay in the logs as context and as rejected answers, but are never
                                    a training target (table `target_flags`)
    bots          users             bot-like: replays the same messages, replies faster or more
                                    regularly than a person types, picks without reading
    min_reading   users             skimmers: most of their reads take ~0 seconds, so their picks,
                                    swipes, thumbs and reads are dropped as preference signal
    repeats       conversations     over-repeated: exact or near-duplicate user messages across
                                    conversations (MinHash); at most `max_copies` of each are kept
    diversity     conversations     exact duplicate conversations; no character or topic above a share
    user_cap      conversations     at most N conversations (and/or training examples) per user;
                                    or keep them all and down-weight (table `weights`)

Filters never read ground truth; `filter_precision_recall` (evaluation only) compares what they
dropped with the simulator's labels.

Every filter runs in three steps so the same code runs on one machine or per partition on Ray
Data: `signature(frames)` (per partition of users: small per-user or per-conversation facts),
`resolve(signatures)` (once, on all signatures: the decisions), `apply(frames, decisions)` (per
partition again). A filter is local (decides inside one user partition: quality, bots, min_reading,
user_cap) or global (needs every partition's signature: repeats, diversity). `run_filters` runs
them in memory, on one partition or several; `run_filters_on_disk` streams a log folder through
user partitions on disk, one in memory at a time, so memory follows the partition, not the logs.

Besides the log tables (same schemas, fewer rows), the result has `labels` (derived from the
unfiltered logs, so that outcomes like "returned within 7 days" still see every session), and
`weights` and `target_flags` (schemas below).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from alignloop.data.neardup import lsh_groups, minhash, normalize, shingles
from alignloop.data.parts import (
    partition_folder,
    read_scratch,
    split_frames,
    write_scratch,
)
from alignloop.data.schema import LOG_SCHEMAS, SCHEMAS, conform
from alignloop.data.stablehash import hash_column
from alignloop.recipes import Section


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


WEIGHTS = pa.schema([
    _f("conversation_id", pa.string(), "-> conversations.conversation_id"),
    _f("user_id", pa.string(), "-> users.user_id"),
    _f("weight", pa.float64(), "training weight of every example from this conversation (1 = full)"),
])
TARGET_FLAGS = pa.schema([
    _f("turn_id", pa.string(), "-> turns.turn_id, an assistant turn that must not be a training target"),
    _f("conversation_id", pa.string(), "-> conversations.conversation_id"),
    _f("reason", pa.string(), "why (quality filter): empty, truncated, unsafe, repetitive, repeats_earlier_turn"),
])
DROPPED = pa.schema([
    _f("filter", pa.string(), "the filter that decided"),
    _f("unit", pa.string(), "users, conversations or turns"),
    _f("id", pa.string(), "the item's id (user_id, conversation_id or turn_id)"),
    _f("user_id", pa.string(), "its user"),
    _f("reason", pa.string(), "why"),
    _f("weight", pa.float64(), "new weight when down-weighted instead of dropped", nullable=True),
])
FILTER_SCHEMAS: dict[str, pa.Schema] = {"weights": WEIGHTS, "target_flags": TARGET_FLAGS}
FILTERED_SCHEMAS: dict[str, pa.Schema] = {**SCHEMAS, **FILTER_SCHEMAS}
"""Every table a filtered log folder holds."""

Frames = dict[str, pl.DataFrame]
TABLE_ORDER = ("users", "sessions", "conversations", "turns", "events", "labels", "weights", "target_flags")

# A small lexicon of words that make an assistant answer unfit to imitate (insults, violence, drugs).
DEFAULT_UNSAFE = [
    "kill", "killing", "murder", "hate", "stupid", "idiot", "moron", "dumb", "worthless", "loser", "weapon",
    "weapons", "bomb", "gun", "drugs", "cocaine", "heroin", "hurt", "suicide", "die",
]
# Coarse topic keywords for the diversity filter (a product would use its own taxonomy).
DEFAULT_TOPICS: dict[str, list[str]] = {
    "food": ["food", "cooking", "recipe", "dinner", "lunch", "breakfast", "pizza", "pasta", "sushi", "tacos",
             "ramen", "curry", "bread", "cheese", "chocolate", "coffee", "tea", "cake", "soup", "noodles",
             "burger", "salad", "cookies", "pancakes", "dumplings", "garlic", "spices", "mango"],
    "travel": ["travel", "trip", "vacation", "beach", "mountains", "flights", "flight", "hotel", "island",
               "passport", "museum", "train", "camping", "hiking", "cruise", "roadtrip", "backpacking",
               "paris", "tokyo", "lisbon", "desert", "ferry", "souvenirs", "volcano"],
    "music": ["music", "song", "songs", "guitar", "piano", "concert", "drums", "jazz", "playlist", "album",
              "lyrics", "singing", "violin", "band", "festival", "rap", "melody", "vinyl", "orchestra",
              "karaoke", "techno", "bass", "chorus", "headphones"],
    "games": ["game", "games", "gaming", "minecraft", "chess", "zelda", "pokemon", "mario", "console",
              "controller", "multiplayer", "puzzle", "arcade", "quest", "dungeon", "esports", "tetris",
              "speedrun", "loot", "boss", "respawn", "joystick", "strategy"],
    "sports": ["sport", "sports", "soccer", "football", "basketball", "tennis", "marathon", "gym", "yoga",
               "swimming", "cycling", "boxing", "skiing", "surfing", "baseball", "hockey", "climbing",
               "volleyball", "rowing", "sprint", "stadium", "referee"],
    "science": ["science", "physics", "chemistry", "biology", "planets", "galaxy", "atoms", "telescope",
                "quantum", "robots", "rockets", "gravity", "dna", "neurons", "fossils", "experiment",
                "microscope", "astronomy", "climate", "electrons", "volcanoes"],
    "pets": ["pet", "pets", "dog", "dogs", "cat", "cats", "puppy", "kitten", "hamster", "parrot", "bunny",
             "goldfish", "vet", "leash", "treats", "tortoise", "ferret", "aquarium", "paws", "kibble",
             "grooming", "litter", "fetch", "whiskers"],
    "movies": ["movie", "movies", "film", "films", "cinema", "popcorn", "director", "actor", "sequel",
               "trilogy", "horror", "comedy", "anime", "netflix", "thriller", "documentary", "oscars",
               "screenplay", "villain", "superhero", "trailer", "blockbuster", "cartoon", "soundtrack"],
}
EDGE_CHARS = " \t\n\"'*,;:()[]~-"
SENTENCE_BREAK = r"[.!?]+|\*[^*\n]{1,40}\*"  # sentence ends, and *gestures* between sentences
ENDS_WELL = r"[.!?…\"'”’)\]*~>]$|[\p{So}\p{Sk}]$"
PREFERENCE_EVENTS = ["select", "swipe", "vote", "read"]


# --- configuration -----------------------------------------------------------------------------


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


class MinReadingConfig(Section):
    """Skimmers: their selections carry no preference, so their preference events are dropped."""

    enabled: bool = True
    min_reads: int = Field(1, ge=1, description="reads needed to judge a user")
    min_read_seconds: float = Field(0.5, ge=0, description="a read shorter than this was not a read")
    max_words_per_second: float = Field(25.0, gt=0, description="nor was one faster than this")
    max_unread_share: float = Field(0.5, ge=0, le=1, description="a skimmer's share of such reads")
    drop_events: list[Literal["message", "read", "swipe", "select", "vote", "edit", "report"]] = Field(
        default_factory=lambda: list(PREFERENCE_EVENTS))


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


class DiversityConfig(Section):
    """Exact duplicate conversations; no character or topic above its share of conversations."""

    enabled: bool = True
    dedup: bool = True
    max_character_share: float | None = Field(0.3, gt=0, le=1)
    max_topic_share: float | None = Field(0.4, gt=0, le=1)
    topics: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TOPICS.items()})
    cap_other: bool = Field(False, description="also cap conversations matching no topic")
    salt: str = "diversity"


class UserCapConfig(Section):
    """Per-user influence cap: drop (or down-weight) conversations beyond the cap."""

    enabled: bool = True
    max_conversations: int | None = Field(50, ge=1)
    max_examples: int | None = Field(None, ge=1, description="selected assistant turns per user")
    mode: Literal["drop", "weight"] = "drop"
    salt: str = "user_cap"


FilterName = Literal["quality", "bots", "min_reading", "repeats", "diversity", "user_cap"]
DEFAULT_ORDER: list[FilterName] = ["quality", "bots", "min_reading", "repeats", "diversity", "user_cap"]


class FilterConfig(Section):
    order: list[FilterName] = Field(default_factory=lambda: list(DEFAULT_ORDER))
    partitions: int = Field(0, ge=0, description="user partitions processed one at a time; 0 = auto (by size)")
    events_per_partition: int = Field(1_000_000, ge=1, description="auto partitions: about this many events each")
    quality: QualityConfig = QualityConfig()
    bots: BotConfig = BotConfig()
    min_reading: MinReadingConfig = MinReadingConfig()
    repeats: RepeatConfig = RepeatConfig()
    diversity: DiversityConfig = DiversityConfig()
    user_cap: UserCapConfig = UserCapConfig()

    @model_validator(mode="after")
    def _unique(self) -> FilterConfig:
        if len(set(self.order)) != len(self.order):
            raise ValueError("order names a filter twice")
        return self


# --- frames ------------------------------------------------------------------------------------


def empty_frame(name: str) -> pl.DataFrame:
    return pl.from_arrow(FILTERED_SCHEMAS[name].empty_table())


def prepare(tables: Mapping[str, pa.Table | pl.DataFrame], derive: bool = True,
            observed_until: datetime | None = None) -> Frames:
    """Polars frames of every table a filter touches: labels derived if missing, weights 1, no flags."""
    frames: Frames = {}
    for name in LOG_SCHEMAS:
        if name not in tables:
            raise KeyError(f"missing log table '{name}'")
    for name, table in tables.items():
        if name in FILTERED_SCHEMAS:
            frames[name] = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    if "labels" not in frames:
        if derive:
            from alignloop.data.labels import derive_labels

            arrow = {k: _arrow(v, k) for k, v in tables.items() if k in LOG_SCHEMAS}
            frames["labels"] = pl.from_arrow(derive_labels(arrow, observed_until))
        else:
            frames["labels"] = empty_frame("labels")
    if "weights" not in frames:
        frames["weights"] = frames["conversations"].select(
            "conversation_id", "user_id", weight=pl.lit(1.0, pl.Float64))
    if "target_flags" not in frames:
        frames["target_flags"] = empty_frame("target_flags")
    return frames


def _arrow(table: pa.Table | pl.DataFrame, name: str) -> pa.Table:
    return conform(name, table.to_arrow() if isinstance(table, pl.DataFrame) else table, FILTERED_SCHEMAS)


def to_arrow(frames: Frames) -> dict[str, pa.Table]:
    """Frames as Arrow tables conformed to their schemas."""
    return {name: _arrow(frames[name], name) for name in TABLE_ORDER if name in frames}


def rows(frames: Frames) -> dict[str, int]:
    return {name: frames[name].height for name in TABLE_ORDER if name in frames}


def fast_words(expr: pl.Expr) -> pl.Expr:
    """Words of single-spaced text (spaces + 1; 0 if empty): several times faster than a regex."""
    return pl.when(expr.str.len_bytes() > 0).then(expr.str.count_matches(" ", literal=True).cast(pl.Int64) + 1
                                                   ).otherwise(0)


def drop_users(frames: Frames, users: pl.DataFrame) -> Frames:
    """Everything of these users (`users` has a user_id column)."""
    if users.height == 0:
        return frames
    users = users.select("user_id").unique()
    convs = frames["conversations"].join(users, on="user_id", how="semi").select("conversation_id")
    out = dict(frames)
    for name in ("users", "sessions", "conversations", "events", "labels", "weights"):
        out[name] = frames[name].join(users, on="user_id", how="anti")
    for name in ("turns", "target_flags"):
        out[name] = frames[name].join(convs, on="conversation_id", how="anti")
    return out


def drop_conversations(frames: Frames, convs: pl.DataFrame) -> Frames:
    """These conversations, with their turns, events, labels, weights and flags (sessions stay)."""
    if convs.height == 0:
        return frames
    convs = convs.select("conversation_id").unique()
    out = dict(frames)
    for name in ("conversations", "turns", "events", "labels", "weights", "target_flags"):
        out[name] = frames[name].join(convs, on="conversation_id", how="anti")
    return out


def _conv_user(frames: Frames) -> pl.DataFrame:
    return frames["conversations"].select("conversation_id", "user_id")


def _read_stats(frames: Frames, min_seconds: float, max_wps: float) -> pl.DataFrame:
    """Per user: reads, and the share of them too short to be reading."""
    reads = frames["events"].filter(pl.col("type") == "read").select("user_id", "turn_id", "value")
    reads = (reads.join(frames["turns"].select("turn_id", "text"), on="turn_id", how="left")
             .with_columns(n_words=fast_words(pl.col("text"))))
    unread = (pl.col("value") < min_seconds) | (
        pl.col("n_words").fill_null(0) > max_wps * pl.col("value"))
    return reads.group_by("user_id").agg(n_reads=pl.len(), unread_share=unread.cast(pl.Float64).mean())


# --- filters -----------------------------------------------------------------------------------


class Filter(ABC):
    """One filter: signature (per partition) -> resolve (once) -> apply (per partition)."""

    name: ClassVar[str]
    unit: ClassVar[str]  # what it decides about: users, conversations or targets (selected answers)
    scope: ClassVar[str] = "local"  # local: decides inside a user partition; global: needs them all

    def __init__(self, config: Section):
        self.config = config

    def items(self, frames: Frames) -> pl.DataFrame:
        """The items it decides about: id, user_id. Filters on other units override this."""
        if self.unit == "users":
            return frames["users"].select(id="user_id", user_id="user_id")
        if self.unit == "conversations":
            return frames["conversations"].select(id="conversation_id", user_id="user_id")
        raise ValueError(f"filter '{self.name}' decides about '{self.unit}' and must define items()")

    @abstractmethod
    def signature(self, frames: Frames) -> pl.DataFrame:
        """What resolve needs from one user partition."""

    @abstractmethod
    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        """Decisions: id, user_id, reason[, weight] -- one row per item dropped (or down-weighted)."""

    @abstractmethod
    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        """One partition's tables with the decisions carried out."""


class QualityFilter(Filter):
    name = "quality"
    unit = "targets"

    def items(self, frames: Frames) -> pl.DataFrame:
        return (self._targets(frames).select(id="turn_id", cid="conversation_id")
                .join(_conv_user(frames), left_on="cid", right_on="conversation_id", how="left")
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
        return (flagged.join(_conv_user(frames), on="conversation_id", how="left")
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
        import re

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


class BotFilter(Filter):
    name = "bots"
    unit = "users"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: BotConfig = self.config
        msgs = (frames["turns"].filter(pl.col("role") == "user")
                .join(_conv_user(frames), on="conversation_id", how="inner")
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
        reads = _read_stats(frames, c.min_read_seconds, c.max_words_per_second)
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


class MinReadingFilter(Filter):
    name = "min_reading"
    unit = "users"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: MinReadingConfig = self.config
        return (frames["users"].select("user_id")
                .join(_read_stats(frames, c.min_read_seconds, c.max_words_per_second), on="user_id", how="left")
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
            return _no_decisions()
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


def share_caps(counts: Mapping[Any, int], share: float, exempt: Iterable[Any] = ()) -> dict[Any, int]:
    """How many items each group may keep so that no group holds more than `share` of the total.

    Only groups above the share are cut, all to the same largest count that satisfies it; exempt
    groups are never cut (but count in the total). Returns {} if no cut can satisfy the share.
    """
    exempt = set(exempt)
    total = sum(counts.values())
    if total == 0 or max(counts.values()) <= share * total:
        return {}
    groups = sorted(((n, g) for g, n in counts.items() if g not in exempt), key=lambda x: (-x[0], str(x[1])))
    rest_exempt = sum(n for g, n in counts.items() if g in exempt)
    for k in range(1, len(groups) + 1):
        if k * share >= 1:
            return {}
        rest = sum(n for n, _ in groups[k:]) + rest_exempt
        m = int(np.floor(share * rest / (1 - k * share)))
        nxt = groups[k][0] if k < len(groups) else 0
        if m <= 0:
            return {}
        if m >= nxt:
            if any(n > share * (k * m + rest) for n, g in ((n, g) for g, n in counts.items() if g in exempt)):
                return {}
            return {g: m for n, g in groups[:k] if n > m}
    return {}


class DiversityFilter(Filter):
    name = "diversity"
    unit = "conversations"
    scope = "global"

    def signature(self, frames: Frames) -> pl.DataFrame:
        c: DiversityConfig = self.config
        convs = frames["conversations"].select("conversation_id", "user_id", "character_id", "started_at")
        turns = frames["turns"]
        # Exact duplicates: same character, same selected path (role and text, case and edges aside).
        path = (turns.filter(pl.col("selected"))
                .sort("conversation_id", "position", "candidate_index")
                .select("conversation_id",
                        h=pl.struct(pl.col("role"), pl.col("text").str.to_lowercase().str.strip_chars()).hash(seed=7))
                .group_by("conversation_id", maintain_order=True).agg("h")
                .select("conversation_id", body=pl.col("h").hash(seed=7)))
        keyed = convs.join(path, on="conversation_id", how="left").with_columns(
            exact=pl.struct(pl.col("character_id"), pl.col("body").fill_null(0)).hash(seed=7))
        out = (keyed.join(self._topics(frames), on="conversation_id", how="left")
               .with_columns(pl.col("topic").fill_null("other"))
               .select("conversation_id", "user_id", "character_id", "started_at", "exact", "topic"))
        return out.with_columns(h=hash_column(out, "conversation_id", c.salt))

    def _topics(self, frames: Frames) -> pl.DataFrame:
        """Each conversation's topic: the one whose keywords its user messages use most (ties: first)."""
        import re

        c: DiversityConfig = self.config
        names = [t for t, ws in c.topics.items() if ws]
        if not names:
            return pl.DataFrame(schema={"conversation_id": pl.String, "topic": pl.String})
        lower = pl.col("text").str.to_lowercase()
        counts = {f"_t{i}": lower.str.count_matches(r"\b(?:" + "|".join(re.escape(w.lower()) for w in c.topics[t])
                                                      + r")\b")
                  for i, t in enumerate(names)}
        per_conv = (frames["turns"].filter(pl.col("role") == "user")
                    .select("conversation_id", **counts)
                    .group_by("conversation_id").sum())
        m = per_conv.select(list(counts)).to_numpy()
        best = np.where(m.max(axis=1) > 0, np.array(names, dtype=object)[m.argmax(axis=1)], "other")
        return per_conv.select("conversation_id").with_columns(topic=pl.Series(best.tolist(), dtype=pl.String))

    def resolve(self, signature: pl.DataFrame) -> pl.DataFrame:
        c: DiversityConfig = self.config
        s = signature.sort("started_at", "conversation_id")
        decided = []
        if c.dedup:
            dup = s.filter(pl.int_range(pl.len()).over("exact") > 0)
            decided.append(dup.select(id="conversation_id", user_id="user_id", reason=pl.lit("duplicate")))
            s = s.join(dup.select("conversation_id"), on="conversation_id", how="anti")
        caps = [(col, share) for col, share in (("character_id", c.max_character_share), ("topic", c.max_topic_share))
                if share is not None]
        for _ in range(5):  # cutting one kind can push the other back above its share
            changed = False
            for col, share in caps:
                counts = dict(s.group_by(col).len().iter_rows())
                exempt = ["other"] if col == "topic" and not c.cap_other else []
                cut = share_caps(counts, share, exempt)
                if not cut:
                    continue
                limits = pl.DataFrame({col: list(cut), "limit": list(cut.values())},
                                      schema={col: pl.String, "limit": pl.Int64})
                ranked = (s.join(limits, on=col, how="inner")
                          .with_columns(rank=pl.col("h").rank("ordinal").over(col)))
                over = ranked.filter(pl.col("rank") > pl.col("limit"))
                label = "character" if col == "character_id" else "topic"
                decided.append(over.select(id="conversation_id", user_id="user_id",
                                           reason=pl.format(f"{label}_share:{{}}", pl.col(col))))
                s = s.join(over.select("conversation_id"), on="conversation_id", how="anti")
                changed = True
            if not changed:
                break
        return pl.concat(decided) if decided else _no_decisions()

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        return drop_conversations(frames, decisions.select(conversation_id="id"))


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


def _no_decisions() -> pl.DataFrame:
    return pl.DataFrame(schema={"id": pl.String, "user_id": pl.String, "reason": pl.String})


FILTERS: dict[str, type[Filter]] = {
    f.name: f for f in (QualityFilter, BotFilter, MinReadingFilter, RepeatFilter, DiversityFilter, UserCapFilter)
}


def make_filters(config: FilterConfig) -> list[Filter]:
    """The enabled filters, in `config.order`."""
    out = []
    for name in config.order:
        section = getattr(config, name)
        if section.enabled:
            out.append(FILTERS[name](section))
    return out


# --- reports -----------------------------------------------------------------------------------


@dataclass
class FilterReport:
    """What one filter did: items in, kept, dropped (kept + dropped == input, always)."""

    name: str
    unit: str
    input: int
    kept: int
    dropped: int
    weighted: int = 0  # kept, but down-weighted
    reasons: dict[str, int] = field(default_factory=dict)
    rows_before: dict[str, int] = field(default_factory=dict)
    rows_after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class FunnelReport:
    """Every filter's report, in order, plus each dropped item with its reason."""

    input_rows: dict[str, int]
    output_rows: dict[str, int]
    filters: list[FilterReport] = field(default_factory=list)
    dropped: pl.DataFrame = field(default_factory=lambda: pl.from_arrow(DROPPED.empty_table()))
    inputs: dict[str, pl.DataFrame] = field(default_factory=dict)  # per filter: the items it judged (id, user_id)
    seconds: float = 0.0

    def __getitem__(self, name: str) -> FilterReport:
        for f in self.filters:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"input_rows": self.input_rows, "output_rows": self.output_rows, "seconds": round(self.seconds, 3),
                "filters": [f.to_dict() for f in self.filters]}

    def summary(self) -> str:
        lines = [f"{'filter':<12} {'unit':<14} {'input':>9} {'kept':>9} {'dropped':>8}  reasons"]
        for f in self.filters:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(f.reasons.items(), key=lambda kv: -kv[1]))
            extra = f" (down-weighted {f.weighted})" if f.weighted else ""
            lines.append(f"{f.name:<12} {f.unit:<14} {f.input:>9} {f.kept:>9} {f.dropped:>8}  {reasons}{extra}")
        return "\n".join(lines)


# --- running -----------------------------------------------------------------------------------


def split_partitions(frames: Frames, partitions: int) -> list[Frames]:
    """The frames cut into user partitions (every row of one user lands in the same partition)."""
    return split_frames(frames, partitions)


def concat_partitions(parts: Sequence[Frames]) -> Frames:
    if len(parts) == 1:
        return parts[0]
    return {name: pl.concat([p[name] for p in parts]) for name in parts[0]}


class _Memory:
    """Partitions kept in memory."""

    def __init__(self, parts: list[Frames]):
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts)

    def load(self, k: int) -> Frames:
        return self.parts[k]

    def save(self, k: int, frames: Frames) -> None:
        self.parts[k] = frames


class _Disk:
    """Partitions on disk: raw logs first (labels derived per partition against the global log
    end), then the state after each pass; one partition in memory at a time."""

    def __init__(self, raw: Path, work: Path, partitions: int, observed_until: datetime | None):
        self.raw, self.work, self.n, self.until = raw, work, partitions, observed_until
        self.saved: dict[int, int] = {}  # partition -> version of its latest saved state

    def __len__(self) -> int:
        return self.n

    def load(self, k: int) -> Frames:
        if k in self.saved:
            tables = read_scratch(partition_folder(self.work, k, self.saved[k]), FILTERED_SCHEMAS)
            return {n: pl.from_arrow(t) for n, t in tables.items()}
        return prepare(read_scratch(partition_folder(self.raw, k), LOG_SCHEMAS), observed_until=self.until)

    def save(self, k: int, frames: Frames) -> None:
        version = self.saved.get(k, -1) + 1  # a new folder per pass: the old one is read until then
        write_scratch(partition_folder(self.work, k, version), to_arrow(frames), FILTERED_SCHEMAS)
        if version:
            import shutil

            shutil.rmtree(partition_folder(self.work, k, version - 1), ignore_errors=True)
        self.saved[k] = version


@dataclass
class _Tally:
    """One filter's numbers, summed over partitions."""

    n_items: int = 0
    items: list[pl.DataFrame] = field(default_factory=list)  # kept only for evaluation
    decisions: list[pl.DataFrame] = field(default_factory=list)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add_rows(self, which: dict[str, int], frames: Frames) -> None:
        for k, v in rows(frames).items():
            which[k] = which.get(k, 0) + v

    def add_items(self, items: pl.DataFrame, keep: bool) -> None:
        self.n_items += items.height
        if keep:
            self.items.append(_own(items))


def _own(df: pl.DataFrame) -> pl.DataFrame:
    """A compact copy owning its memory. Polars strings are views into their source's buffers, so
    a small frame kept from a partition (decisions, signatures) would otherwise pin the whole
    partition's id columns in memory until the end of the run."""
    return pl.from_arrow(df.to_arrow(compat_level=pl.CompatLevel.oldest()))


def _check(flt: Filter, items: pl.DataFrame, decisions: pl.DataFrame) -> None:
    unknown = decisions.join(items, on="id", how="anti").height
    if unknown:
        raise RuntimeError(f"filter {flt.name}: {unknown} decision(s) about items it was not given")


def _drive(store: _Memory | _Disk, filters: list[Filter], keep_inputs: bool,
           emit: Any = None) -> tuple[FunnelReport, list[pl.DataFrame]]:
    """Run `filters` over the partitions of `store`, in order.

    A local filter (per-user or per-turn decisions) runs start to end inside each partition. A
    global one (repeats, diversity) needs every partition's signature first: a pass computes the
    signatures (and saves each partition), the filter resolves once, and the next pass applies it
    before going on. Consecutive global filters about conversations share a pass: a conversation's
    signature does not depend on the others, so each later one resolves without the conversations
    the earlier ones dropped. With `emit`, each finished partition goes to `emit(k, frames)`.
    """
    tallies = {f.name: _Tally() for f in filters}
    input_rows: dict[str, int] = {}
    i = 0
    pending: list[tuple[Filter, pl.DataFrame]] = []
    while True:
        g = next((j for j in range(i, len(filters)) if filters[j].scope == "global"), len(filters))
        h = g
        while h < len(filters) and filters[h].scope == "global" and (h == g or filters[h].unit == "conversations"
                                                                     and filters[h - 1].unit == "conversations"):
            h += 1
        local, batch = filters[i:g], filters[g:h]
        signatures: dict[str, list[pl.DataFrame]] = {f.name: [] for f in batch}
        for k in range(len(store)):
            frames = store.load(k)
            if i == 0:
                _Tally().add_rows(input_rows, frames)
            for flt, decisions in pending:
                t = tallies[flt.name]
                start = time.perf_counter()
                if flt is not pending[0][0]:
                    t.add_rows(t.before, frames)
                frames = flt.apply(frames, decisions)
                t.add_rows(t.after, frames)
                t.seconds += time.perf_counter() - start
            for flt in local:
                t = tallies[flt.name]
                start = time.perf_counter()
                t.add_rows(t.before, frames)
                items = flt.items(frames)
                decisions = flt.resolve(flt.signature(frames))
                _check(flt, items, decisions)
                frames = flt.apply(frames, decisions)
                t.add_rows(t.after, frames)
                t.add_items(items, keep_inputs)
                t.decisions.append(_own(decisions))
                t.seconds += time.perf_counter() - start
            for n, flt in enumerate(batch):
                t = tallies[flt.name]
                start = time.perf_counter()
                if n == 0:
                    t.add_rows(t.before, frames)
                t.items.append(_own(flt.items(frames)))  # trimmed below, once earlier decisions are known
                signatures[flt.name].append(_own(flt.signature(frames)))
                t.seconds += time.perf_counter() - start
            if batch:
                store.save(k, frames)
            elif emit is not None:
                emit(k, frames)
            else:
                store.save(k, frames)
        if not batch:
            break
        pending = []
        gone = pl.DataFrame(schema={"conversation_id": pl.String})
        for flt in batch:
            t = tallies[flt.name]
            start = time.perf_counter()
            items = pl.concat(t.items).join(gone, left_on="id", right_on="conversation_id", how="anti")
            t.items = []
            t.add_items(items, keep_inputs)
            signature = pl.concat(signatures.pop(flt.name))
            if "conversation_id" in signature.columns and gone.height:
                signature = signature.join(gone, on="conversation_id", how="anti")
            decisions = flt.resolve(signature)
            _check(flt, items, decisions)
            t.decisions.append(decisions)
            t.seconds += time.perf_counter() - start
            pending.append((flt, decisions))
            if flt.unit == "conversations" and not (flt.name == "user_cap" and flt.config.mode == "weight"):
                gone = pl.concat([gone, decisions.select(conversation_id="id")])
        i = h
    report = FunnelReport(input_rows=input_rows, output_rows={})
    dropped = []
    previous = input_rows
    for flt in filters:
        t = tallies[flt.name]
        decisions = pl.concat(t.decisions) if t.decisions else _no_decisions()
        report.filters.append(_filter_report(flt, t.n_items, decisions, t.before, t.after, t.seconds))
        dropped.append(_dropped_rows(flt, decisions))
        if keep_inputs:
            report.inputs[flt.name] = (pl.concat(t.items) if t.items
                                       else pl.DataFrame(schema={"id": pl.String, "user_id": pl.String}))
        previous = t.after
    report.output_rows = dict(previous)
    return report, dropped


def run_filters(tables: Mapping[str, pa.Table | pl.DataFrame], config: FilterConfig | None = None,
                keep_inputs: bool = True) -> tuple[Frames, FunnelReport]:
    """Run the enabled filters in order; returns the filtered frames and the funnel report.

    `tables`: the five log tables (labels optional: derived from them when missing). With
    `config.partitions > 1` the work runs one user partition at a time, as a Ray Data job would
    run it per block; the result is the same.
    """
    config = config or FilterConfig()
    t0 = time.perf_counter()
    frames = prepare(tables)
    store = _Memory(split_partitions(frames, max(config.partitions, 1)))
    report, dropped = _drive(store, make_filters(config), keep_inputs)
    out = concat_partitions(store.parts)
    report.output_rows = rows(out)
    if dropped:
        report.dropped = pl.concat(dropped)
    report.seconds = time.perf_counter() - t0
    return out, report


def auto_partitions(events: int, events_per_partition: int) -> int:
    """One partition (all in memory, fastest) up to 1.5x the partition size, else about that size each."""
    return 1 if events <= 1.5 * events_per_partition else -(-events // events_per_partition)


def run_filters_on_disk(source: str | Path, out_dir: str | Path, config: FilterConfig | None = None,
                        partitions: int | None = None, work_dir: str | Path | None = None,
                        keep_inputs: bool = True) -> tuple[list[Path], FunnelReport]:
    """`run_filters` streamed: the log folder `source` is cut into user partitions on disk and each
    pass holds one partition in memory, so memory follows the partition size, not the log size.

    Writes the filtered tables into `out_dir` (one file per table, partitions as row groups, indexed
    by `partitions.json` for the builders). Returns the files written and the report.
    """
    import tempfile

    from alignloop.data.parts import PartitionedWriter, count_rows, repartition

    config = config or FilterConfig()
    t0 = time.perf_counter()
    n = partitions or config.partitions or auto_partitions(count_rows(source), config.events_per_partition)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="alignloop-filter-", dir=work_dir) as tmp:
        info = repartition(source, Path(tmp) / "raw", n)
        store = _Disk(Path(tmp) / "raw", Path(tmp) / "state", n, info["observed_until"])
        with PartitionedWriter(out_dir, FILTERED_SCHEMAS, TABLE_ORDER) as writer:
            report, dropped = _drive(store, make_filters(config), keep_inputs,
                                     emit=lambda k, frames: writer.write(to_arrow(frames)))
        files = writer.close()
    if dropped:
        report.dropped = pl.concat(dropped)
    report.seconds = time.perf_counter() - t0
    return files, report


def _filter_report(flt: Filter, n_items: int, decisions: pl.DataFrame, before: dict[str, int],
                   after: dict[str, int], seconds: float) -> FilterReport:
    weighted = flt.name == "user_cap" and flt.config.mode == "weight"
    n_dec = decisions.select(pl.col("id").n_unique()).item() if decisions.height else 0
    reasons = dict(decisions.group_by("reason").len().sort("reason").iter_rows()) if decisions.height else {}
    dropped = 0 if weighted else n_dec
    return FilterReport(name=flt.name, unit=flt.unit, input=n_items, kept=n_items - dropped,
                        dropped=dropped, weighted=n_dec if weighted else 0, reasons=reasons,
                        rows_before=before, rows_after=after, seconds=round(seconds, 4))


def _dropped_rows(flt: Filter, decisions: pl.DataFrame) -> pl.DataFrame:
    weight = pl.col("weight") if "weight" in decisions.columns else pl.lit(None, pl.Float64)
    out = decisions.select(filter=pl.lit(flt.name), unit=pl.lit(flt.unit), id="id", user_id="user_id",
                           reason="reason", weight=weight.cast(pl.Float64))
    return out.cast({"filter": pl.String, "unit": pl.String})


# --- evaluation (simulated logs only) -----------------------------------------------------------


def _truth_frame(table: pa.Table | pl.DataFrame) -> pl.DataFrame:
    return table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)


def filter_precision_recall(report: FunnelReport, ground_truth: Mapping[str, pa.Table | pl.DataFrame]
                            ) -> dict[str, dict[str, Any]]:
    """Each filter's precision and recall against the simulator's ground truth (evaluation only).

    Targets: bots -> users that are bots; min_reading -> skimmers (also reported: any non-reader,
    skimmer or bot); repeats -> conversations of bots; quality -> candidates with unsafe words or
    repeated sentences (by reason: unsafe, repetitive, repeats_earlier_turn). Computed over the items
    each filter judged (`report.inputs`); filters without a ground-truth target are left out.
    """
    users = _truth_frame(ground_truth["users"]).select("user_id", "is_bot", "is_skimmer")
    out: dict[str, dict[str, Any]] = {}
    for f in report.filters:
        items = report.inputs.get(f.name)
        if items is None:
            continue
        flagged = report.dropped.filter(pl.col("filter") == f.name).select("id", "reason").unique("id")
        judged = items.join(flagged, on="id", how="left").with_columns(pred=pl.col("reason").is_not_null())
        if f.name in ("bots", "min_reading", "repeats"):
            judged = judged.join(users, on="user_id", how="left").with_columns(pl.col("is_bot", "is_skimmer").fill_null(False))
            target = {"bots": "is_bot", "min_reading": "is_skimmer", "repeats": "is_bot"}[f.name]
            out[f.name] = _pr(judged["pred"], judged[target])
            if f.name == "min_reading":
                out[f.name]["non_reader"] = _pr(judged["pred"], judged["is_bot"] | judged["is_skimmer"])
        elif f.name == "quality" and "candidates" in ground_truth:
            cand = _truth_frame(ground_truth["candidates"]).select(
                id="turn_id", unsafe=pl.col("n_unsafe") > 0, within=pl.col("repeat_within") > 0,
                across=pl.col("repeat_across") > 0.5)
            j = judged.join(cand, on="id", how="inner")
            bad = j["unsafe"] | j["within"] | j["across"]
            res = _pr(j["pred"], bad)
            res["by_reason"] = {
                r: _pr(j["reason"] == r, j[col]) for r, col in
                (("unsafe", "unsafe"), ("repetitive", "within"), ("repeats_earlier_turn", "across"))}
            out[f.name] = res
    return out


def _pr(pred: pl.Series, actual: pl.Series) -> dict[str, Any]:
    pred = pred.fill_null(False).to_numpy().astype(bool)
    actual = actual.fill_null(False).to_numpy().astype(bool)
    tp = int((pred & actual).sum())
    fp = int((pred & ~actual).sum())
    fn = int((~pred & actual).sum())
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "tp": tp, "fp": fp, "fn": fn, "n": len(pred)}


# --- plot --------------------------------------------------------------------------------------


def funnel_plot(report: FunnelReport, path: str | Path) -> Path:
    """A PNG funnel: rows left in each log table after each filter, with what each filter dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    tables = ["users", "conversations", "turns", "events"]
    stages = ["input"] + [f.name for f in report.filters]
    counts = {t: [report.input_rows.get(t, 0)] + [f.rows_after.get(t, 0) for f in report.filters] for t in tables}
    fig, axes = plt.subplots(1, len(tables) + 1, figsize=(4.2 * (len(tables) + 1), 0.55 * len(stages) + 2.2),
                             sharey=True)
    y = np.arange(len(stages))[::-1]
    for ax, t in zip(axes, tables):
        values = counts[t]
        top = max(values) or 1
        ax.barh(y, values, color="#4C72B0", alpha=0.85)
        for yi, v, prev in zip(y, values, [values[0]] + values[:-1]):
            lost = prev - v
            ax.text(v + top * 0.01, yi, f"{v:,}" + (f"  (-{lost:,})" if lost else ""), va="center", fontsize=8)
        ax.set_title(t)
        ax.set_xlim(0, top * 1.45)
        ax.tick_params(axis="x", labelsize=7)
    ax = axes[-1]
    for yi, f in zip(y[1:], report.filters):
        share = 100.0 * f.dropped / f.input if f.input else 0.0
        weighted = 100.0 * f.weighted / f.input if f.input else 0.0
        ax.barh(yi, share, color="#C44E52", alpha=0.85)
        if weighted:
            ax.barh(yi, weighted, left=share, color="#DD8452", alpha=0.85)
        top_reasons = sorted(f.reasons.items(), key=lambda kv: -kv[1])[:2]
        note = f"{f.dropped + f.weighted:,} of {f.input:,} {f.unit}: " + "; ".join(f"{k} {v}" for k, v in top_reasons)
        ax.text(1, yi - 0.36, note[:70], fontsize=7, va="center")
    ax.set_xlim(0, 100)
    ax.set_title("% of its items each filter dropped (red)\nor down-weighted (orange)", fontsize=9)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([f"{s}" + (f" [{f.unit}]" if i else "") for i, (s, f) in
                             enumerate(zip(stages, [None] + report.filters))])
    fig.suptitle("log filter funnel", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
