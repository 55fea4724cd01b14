"""Who is in the simulated world: users with hidden traits, and the characters they chat with.

A user's traits never enter the logs; they are ground truth, written beside the logs for
evaluation only. Tastes run from -1 (dislikes) to +1 (likes). Activity (mean sessions per day) is
log-normal, so a few users produce a large share of all events, as in real products. Bots and
skimmers are kinds of users: bots repeat the same few messages, choose at random, never read;
skimmers are people who choose without reading.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import numpy as np

from alignloop.sim.lexicon import N_TOPICS, TOPIC_NAMES

NORMAL, BOT, SKIMMER = 0, 1, 2
KINDS = ("normal", "bot", "skimmer")


@dataclass
class Population:
    """One row per user; every field is a numpy array of length `n` (topics: n x N_TOPICS)."""

    index: np.ndarray          # global user number in the world (0..users-1)
    kind: np.ndarray           # NORMAL, BOT or SKIMMER
    pref_len: np.ndarray       # preferred response length, words
    question_taste: np.ndarray  # liking for follow-up questions, -1..1
    emoji_taste: np.ndarray
    gesture_taste: np.ndarray  # liking for vivid role-play gestures like *smiles*
    topics: np.ndarray         # topic interests, rows sum to 1
    activity: np.ndarray       # mean sessions per day when satisfied
    patience: np.ndarray       # 0..1: longer conversations, more forgiving
    read_speed: np.ndarray     # words per second
    vote_rate: np.ndarray      # how often they give a thumb
    choosiness: np.ndarray     # inverse temperature of the choice among candidates
    hour: np.ndarray           # preferred hour of day to visit
    join_day: np.ndarray       # first day they may visit

    @property
    def n(self) -> int:
        return len(self.index)

    def take(self, rows: np.ndarray) -> Population:
        return Population(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def user_ids(tag: str, index: np.ndarray) -> list[str]:
    """Hashed user ids: what a product logs instead of account ids."""
    return ["u" + hashlib.blake2b(f"{tag}/{i}".encode(), digest_size=8).hexdigest() for i in index.tolist()]


def sample_population(rng: np.random.Generator, first: int, n: int, days: int, bot_fraction: float,
                      skimmer_fraction: float, activity_median: float, activity_sigma: float) -> Population:
    """`n` users numbered from `first`."""
    u = rng.random(n)
    kind = np.where(u < bot_fraction, BOT, np.where(u < bot_fraction + skimmer_fraction, SKIMMER, NORMAL))
    pref_len = np.clip(np.exp(rng.normal(np.log(40.0), 0.7, n)), 6, 200)

    def taste() -> np.ndarray:
        return np.clip(rng.normal(0.0, 0.6, n), -1.0, 1.0)

    question, emoji, gesture = taste(), taste(), taste()
    # A few topics each: a sparse Dirichlet.
    topics = rng.dirichlet(np.full(N_TOPICS, 0.3), n)
    activity = np.clip(np.exp(rng.normal(np.log(activity_median), activity_sigma, n)), 0.02, 12.0)
    # Bots are busy: a session or two every day, whatever happens.
    activity = np.where(kind == BOT, rng.uniform(0.5, 2.0, n), activity)
    patience = rng.beta(2.5, 2.0, n)
    read_speed = np.clip(rng.normal(4.0, 1.0, n), 2.0, 8.0)
    vote_rate = rng.beta(1.2, 6.0, n)
    choosiness = rng.uniform(1.0, 3.0, n)
    hour = np.clip(rng.normal(19.0, 3.5, n), 6.0, 23.5)
    join_day = np.minimum(rng.integers(0, max(1, days // 2 + 1), n), max(days - 1, 0))
    return Population(
        index=np.arange(first, first + n), kind=kind.astype(np.int8), pref_len=pref_len,
        question_taste=question, emoji_taste=emoji, gesture_taste=gesture, topics=topics,
        activity=activity, patience=patience, read_speed=read_speed, vote_rate=vote_rate,
        choosiness=choosiness, hour=hour, join_day=join_day,
    )


@dataclass(frozen=True)
class Character:
    id: str
    name: str
    topic: int             # index into TOPIC_NAMES; -1: anything
    roleplay: float        # multiplies the responder's gesture rate
    emoji: float           # multiplies the responder's emoji rate
    description: str

    @property
    def system_prompt(self) -> str:
        return f"You are {self.name}, {self.description}. Stay in character and keep the user company."


def _topic(name: str) -> int:
    return TOPIC_NAMES.index(name)


CHARACTERS: tuple[Character, ...] = (
    Character("chef-marco", "Chef Marco", _topic("food"), 1.0, 1.0,
              "a warm Italian chef who loves feeding people"),
    Character("luna", "Luna the Traveler", _topic("travel"), 1.5, 1.2,
              "a wandering storyteller who has seen the world"),
    Character("dj-nova", "DJ Nova", _topic("music"), 1.0, 2.0, "an upbeat DJ who lives for the next track"),
    Character("pixel", "Pixel", _topic("games"), 0.8, 1.5, "a cheeky gamer sprite from an old arcade cabinet"),
    Character("coach-riley", "Coach Riley", _topic("sports"), 0.6, 1.0,
              "an encouraging coach who never gives up on you"),
    Character("prof-quark", "Professor Quark", _topic("science"), 0.5, 0.5,
              "a curious scientist who explains with wonder"),
    Character("whiskers", "Mr. Whiskers", _topic("pets"), 2.0, 1.5, "a talking cat with strong opinions"),
    Character("sam", "Cinema Sam", _topic("movies"), 1.0, 1.0, "a film buff who quotes every movie"),
    Character("sir-aldric", "Sir Aldric", -1, 2.5, 0.3, "a gallant knight from a faraway kingdom"),
    Character("ava", "Ava", -1, 1.0, 1.0, "a kind friend who is always there to listen"),
)


def character_weights(characters: tuple[Character, ...], topics: np.ndarray) -> np.ndarray:
    """Users pick characters whose topic they like (rows: users, columns: characters; rows sum to 1)."""
    weights = np.empty((topics.shape[0], len(characters)))
    for j, c in enumerate(characters):
        weights[:, j] = 0.05 + (topics[:, c.topic] if c.topic >= 0 else 0.25)
    return weights / weights.sum(axis=1, keepdims=True)
