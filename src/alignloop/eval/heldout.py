"""Held-out simulated users and the prompts they write, for ground-truth evaluation.

Users are sampled fresh from their own seed, so none of them is a user whose logs trained anything
(`check_disjoint` verifies it against training logs or datasets by user id). Each user opens new
conversations with characters they like, as in the simulator: the prompt is the character's system
prompt and the user's first message, written by `sim.messages` so it leaks the user's hidden taste
the same way logged messages do. Their traits stay here, for scoring; a model sees only the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from alignloop.errors import AlignloopError
from alignloop.recipes import Section
from alignloop.sim import engagement as eg
from alignloop.sim.lexicon import PIECES
from alignloop.sim.messages import write_messages
from alignloop.sim.traits import (
    CHARACTERS,
    NORMAL,
    Population,
    character_weights,
    sample_population,
    user_ids,
)

# Salts the generator so a held-out population never equals a simulated world's with the same seed.
_STREAM = 0x5E1D0


class UsersSection(Section):
    """Who the held-out users are: fresh users of their own seed (never a training world's)."""

    seed: int = Field(1000, description="held-out users' seed; use one no training world used")
    users: int = Field(200, ge=2, description="users sampled")
    prompts_per_user: int = Field(1, ge=1, description="first messages per user (a new conversation each)")
    characters: int = Field(10, ge=1, le=len(CHARACTERS), description="built-in characters they may pick")
    exclude: list[str] = Field(default_factory=list,
                               description="training logs folders or dataset files: their users must not appear")


@dataclass
class HeldoutPrompts:
    """One row per prompt: who wrote it (id, index into the users, hidden taste), to whom, and what."""

    user_ids: list[str]
    user_rows: np.ndarray           # prompt -> user row (0..users-1), for per-user statistics
    taste: eg.Taste                 # the writer's hidden taste, one row per prompt
    characters: np.ndarray          # index into CHARACTERS
    messages: list[list[dict]]      # [system, user]: what the model is asked
    user_texts: list[str]           # the user message alone (what relevance is measured against)

    def __len__(self) -> int:
        return len(self.user_texts)

    @property
    def n_users(self) -> int:
        return int(np.unique(self.user_rows).size)

    def records(self) -> list[dict]:
        """The prompts as JSON rows (no hidden traits), for the run folder."""
        return [{"user_id": u, "character_id": CHARACTERS[c].id, "messages": m}
                for u, c, m in zip(self.user_ids, self.characters.tolist(), self.messages, strict=True)]


def sample_users(section: UsersSection) -> tuple[list[str], Population]:
    """Fresh normal users (no bots or skimmers: they have no taste to measure) and their ids."""
    rng = np.random.default_rng([section.seed, _STREAM])
    pop = sample_population(rng, 0, section.users, days=1, bot_fraction=0.0, skimmer_fraction=0.0,
                            activity_median=0.4, activity_sigma=1.2)
    assert (pop.kind == NORMAL).all()
    return user_ids(f"heldout-{section.seed}", pop.index), pop


def heldout_prompts(section: UsersSection) -> HeldoutPrompts:
    """The prompts held-out users write: deterministic for the section."""
    ids, pop = sample_users(section)
    rng = np.random.default_rng([section.seed, _STREAM, 1])
    rows = np.repeat(np.arange(pop.n), section.prompts_per_user)
    characters = CHARACTERS[: section.characters]
    cumulative = np.cumsum(character_weights(characters, pop.topics[rows]), axis=1)
    u = rng.random(rows.size)[:, None]
    chars = np.minimum((u > cumulative).sum(axis=1), len(characters) - 1)
    texts = PIECES.render(write_messages(rng, pop, rows)).to_pylist()
    messages = [[{"role": "system", "content": characters[c].system_prompt}, {"role": "user", "content": t}]
                for c, t in zip(chars.tolist(), texts, strict=True)]
    return HeldoutPrompts(user_ids=[ids[r] for r in rows.tolist()], user_rows=rows, taste=eg.Taste.of(pop, rows),
                          characters=chars, messages=messages, user_texts=texts)


# --- disjointness --------------------------------------------------------------------------------


def user_ids_in(path: str | Path) -> set[str]:
    """Every user id in a logs folder (its users table), a run stage folder, or a dataset file."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("users.parquet", "users.jsonl", "logs/users.parquet", "logs/users.jsonl",
                          "tables/users.parquet"):
            if (path / candidate).is_file():
                return user_ids_in(path / candidate)
        files = sorted(path.glob("*.parquet")) + sorted(path.glob("*.jsonl"))
        if not files:
            raise AlignloopError(f"{path}: no users table or dataset files to read user ids from")
        return set().union(*(user_ids_in(f) for f in files))
    if not path.is_file():
        raise AlignloopError(f"{path}: not found (listed to check that held-out users trained nothing)")
    if path.suffix == ".parquet":
        if "user_id" not in pq.read_schema(path).names:
            raise AlignloopError(f"{path}: no user_id column")
        return set(pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist())
    ids = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AlignloopError(f"{path}:{number}: not JSON ({e.msg})") from None
                if isinstance(row, dict) and row.get("user_id") is not None:
                    ids.add(row["user_id"])
    return ids


def check_disjoint(held_out: Sequence[str], training: Sequence[str | Path], what: str = "held-out users") -> int:
    """Raise if any held-out user id appears in the training sources; return how many ids were checked against."""
    held = set(held_out)
    seen = 0
    for source in training:
        ids = user_ids_in(source)
        seen += len(ids)
        both = held & ids
        if both:
            raise AlignloopError(f"{len(both)} {what} also appear in {source} (e.g. {min(both)}): "
                                 f"they are not held out")
    return seen
