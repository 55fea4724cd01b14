"""The diversity filter: exact duplicate conversations, and no character or topic above its share."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import polars as pl
from pydantic import Field

from alignloop.data.filters.base import Filter, Frames, drop_conversations, no_decisions
from alignloop.data.stablehash import hash_column
from alignloop.recipes import Section

# Coarse topic keywords (a product would use its own taxonomy).
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


class DiversityConfig(Section):
    """Exact duplicate conversations; no character or topic above its share of conversations."""

    enabled: bool = True
    dedup: bool = True
    max_character_share: float | None = Field(0.3, gt=0, le=1)
    max_topic_share: float | None = Field(0.4, gt=0, le=1)
    topics: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TOPICS.items()})
    cap_other: bool = Field(False, description="also cap conversations matching no topic")
    salt: str = "diversity"



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
        return pl.concat(decided) if decided else no_decisions()

    def apply(self, frames: Frames, decisions: pl.DataFrame) -> Frames:
        return drop_conversations(frames, decisions.select(conversation_id="id"))
