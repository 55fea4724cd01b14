"""The ground truth: how much a user engages with a response, and what they do because of it.

1. *Features*: measurable properties of a response text in its context: length in words, whether it
   asks a question, emojis, role-play gestures, relevance (share of the user's content words it
   picks up), content words per topic, repetition within the response and across the previous
   responses of the conversation, unsafe words. `measure` reads them off any text (a real model's
   answer); `features_from_pieces` gets the same numbers from the simulator's piece table quickly.
2. *Engagement*: a utility, a weighted sum of how those features fit the user's hidden taste
   (`engagement`); `quality = sigmoid(engagement)` in (0, 1).
3. *Behaviour*: swipe probability, choice among candidates, thumbs, reading time, continuing,
   time to the next message, starting another conversation, coming back on later days.

Everything here is a pure function of numpy arrays (one row per response or user); randomness
comes in as arguments (uniform or normal noise), so the same inputs always give the same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from alignloop.sim.lexicon import (
    EMOJI_RE,
    GESTURE_RE,
    N_TOPICS,
    N_WORDS,
    PIECES,
    TOPIC_NAMES,
    TOPICS,
    UNSAFE,
    WORDS_PER_TOPIC,
    content_words,
    sentences,
    tokens,
)
from alignloop.sim.traits import BOT, NORMAL, SKIMMER, Population

_TOPIC_OF = {w: k for k, name in enumerate(TOPIC_NAMES) for w in TOPICS[name]}


@dataclass
class Features:
    """Measurable properties of n responses (arrays of length n; topic_counts n x N_TOPICS)."""

    n_words: np.ndarray
    asks_question: np.ndarray
    n_emoji: np.ndarray
    n_gestures: np.ndarray
    relevance: np.ndarray      # share of the user message's content words the response uses, 0..1
    topic_counts: np.ndarray   # distinct content words of each topic in the response
    repeat_within: np.ndarray  # share of the response's sentences that repeat an earlier one in it, 0..1
    repeat_across: np.ndarray  # share of its distinct sentences already said in the conversation, 0..1
    n_unsafe: np.ndarray

    def __len__(self) -> int:
        return len(self.n_words)

    def take(self, rows: np.ndarray) -> Features:
        return Features(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        return Features(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Features)})


# --- features ----------------------------------------------------------------------------------


def measure(texts: Sequence[str], user_texts: Sequence[str], histories: Sequence[Sequence[str]]) -> Features:
    """Features of `texts[i]` as an answer to `user_texts[i]` after assistant turns `histories[i]`."""
    n = len(texts)
    out = {name: np.zeros(n, dtype=np.int64) for name in ("n_words", "n_emoji", "n_gestures", "n_unsafe")}
    asks = np.zeros(n, dtype=bool)
    relevance = np.zeros(n)
    topic_counts = np.zeros((n, N_TOPICS), dtype=np.int64)
    within = np.zeros(n)
    across = np.zeros(n)
    for i, (text, user, history) in enumerate(zip(texts, user_texts, histories, strict=True)):
        out["n_words"][i] = len(text.split())
        out["n_emoji"][i] = len(EMOJI_RE.findall(text))
        out["n_gestures"][i] = len(GESTURE_RE.findall(text))
        out["n_unsafe"][i] = sum(w in UNSAFE for w in tokens(text))
        asks[i] = "?" in text
        words = content_words(text)
        wanted = content_words(user)
        relevance[i] = len(words & wanted) / len(wanted) if wanted else 0.0
        for w in words:
            if w in _TOPIC_OF:
                topic_counts[i, _TOPIC_OF[w]] += 1
        said = sentences(text)
        distinct = set(said)
        within[i] = (len(said) - len(distinct)) / len(said) if said else 0.0
        before = {s for h in history for s in sentences(h)}
        across[i] = len(distinct & before) / len(distinct) if distinct else 0.0
    return Features(asks_question=asks, relevance=relevance, topic_counts=topic_counts, repeat_within=within,
                    repeat_across=across, **out)


def _keys(matrix: np.ndarray, base: int) -> np.ndarray:
    """Sorted keys row * base + value over the non-negative entries of a matrix (duplicates kept)."""
    flat = matrix.ravel()
    at = np.flatnonzero(flat >= 0)
    keys = (at // matrix.shape[1]).astype(np.int64) * base + flat[at]
    keys.sort()
    return keys


def _unique(sorted_keys: np.ndarray) -> np.ndarray:
    keep = np.ones(sorted_keys.size, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=keep[1:])
    return sorted_keys[keep]


def _member(keys: np.ndarray, sorted_pool: np.ndarray) -> np.ndarray:
    if sorted_pool.size == 0:
        return np.zeros(keys.size, dtype=bool)
    at = np.minimum(np.searchsorted(sorted_pool, keys), sorted_pool.size - 1)
    return sorted_pool[at] == keys


def features_from_pieces(pieces: np.ndarray, user_words: np.ndarray, history: np.ndarray) -> Features:
    """`measure`, for texts made of pieces: row i of `pieces` (-1 padded) answers a message whose
    content word ids are row i of `user_words`, after earlier responses whose piece ids are row i
    of `history`. Equal to `measure` on the rendered texts (tested)."""
    n = pieces.shape[0]
    n_words, n_emoji, n_gestures, n_questions, n_unsafe = PIECES.unpack(PIECES.packed[pieces].sum(axis=1))
    resp_words = _unique(_keys(PIECES.word[pieces], N_WORDS))
    rows = resp_words // N_WORDS
    topic_counts = np.bincount(rows * N_TOPICS + (resp_words % N_WORDS) // WORDS_PER_TOPIC,
                               minlength=n * N_TOPICS).reshape(n, N_TOPICS)
    wanted = _unique(_keys(user_words, N_WORDS))
    n_wanted = np.bincount(wanted // N_WORDS, minlength=n)
    hits = np.bincount(rows[_member(resp_words, wanted)], minlength=n)
    relevance = np.divide(hits, n_wanted, out=np.zeros(n), where=n_wanted > 0)

    said = _keys(np.where(PIECES.sentence[pieces], pieces, -1), PIECES.size)
    n_said = np.bincount(said // PIECES.size, minlength=n)
    distinct = _unique(said)
    n_distinct = np.bincount(distinct // PIECES.size, minlength=n)
    within = np.divide(n_said - n_distinct, n_said, out=np.zeros(n), where=n_said > 0)
    repeated = np.bincount(distinct[_member(distinct, _keys(history, PIECES.size))] // PIECES.size, minlength=n)
    across = np.divide(repeated, n_distinct, out=np.zeros(n), where=n_distinct > 0)
    return Features(
        n_words=n_words, asks_question=n_questions > 0, n_emoji=n_emoji, n_gestures=n_gestures,
        relevance=relevance, topic_counts=topic_counts, repeat_within=within, repeat_across=across,
        n_unsafe=n_unsafe,
    )


# --- engagement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    length: float = 2.0          # times length fit, 0..1
    length_width: float = 0.5    # in log(words): how fast the fit falls off
    question: float = 1.0        # times question taste when the response asks one
    emoji: float = 1.0           # times emoji taste, saturating at 2 emojis
    gesture: float = 1.0         # times gesture taste, saturating at 2 gestures
    relevance: float = 1.5
    topic: float = 1.0           # times interest-weighted topic words, saturating at 2 per topic
    repeat_within: float = 2.0
    repeat_across: float = 2.5
    unsafe: float = 3.0          # per unsafe word, up to 2
    bias: float = -2.0


WEIGHTS = Weights()


@dataclass
class Taste:
    """The traits engagement depends on, one row per response (the user it is shown to)."""

    pref_len: np.ndarray
    question: np.ndarray
    emoji: np.ndarray
    gesture: np.ndarray
    topics: np.ndarray

    @staticmethod
    def of(pop: Population, rows: np.ndarray) -> Taste:
        return Taste(pop.pref_len[rows], pop.question_taste[rows], pop.emoji_taste[rows],
                     pop.gesture_taste[rows], pop.topics[rows])


def length_fit(n_words: np.ndarray, pref_len: np.ndarray, width: float = WEIGHTS.length_width) -> np.ndarray:
    """1 at the preferred length, falling off with the log ratio."""
    ratio = np.log((np.asarray(n_words) + 1.0) / (np.asarray(pref_len) + 1.0))
    return np.exp(-0.5 * (ratio / width) ** 2)


def topic_match(topic_counts: np.ndarray, topics: np.ndarray) -> np.ndarray:
    return (np.minimum(topic_counts, 2) / 2.0 * topics).sum(axis=-1)


def engagement(f: Features, taste: Taste, w: Weights = WEIGHTS) -> np.ndarray:
    """The user's utility for each response; higher is better, roughly -6..4."""
    return (
        w.length * length_fit(f.n_words, taste.pref_len, w.length_width)
        + w.question * taste.question * f.asks_question
        + w.emoji * taste.emoji * np.minimum(f.n_emoji, 2) / 2.0
        + w.gesture * taste.gesture * np.minimum(f.n_gestures, 2) / 2.0
        + w.relevance * f.relevance
        + w.topic * topic_match(f.topic_counts, taste.topics)
        - w.repeat_within * f.repeat_within
        - w.repeat_across * f.repeat_across
        - w.unsafe * np.minimum(f.n_unsafe, 2)
        + w.bias
    )


def quality(e: np.ndarray) -> np.ndarray:
    """Engagement as the probability that the user finds the response good."""
    return 1.0 / (1.0 + np.exp(-np.asarray(e, dtype=float)))


# --- behaviour ---------------------------------------------------------------------------------

BOT_SWIPE = 0.25       # bots and skimmers cannot judge, so they swipe at a fixed rate
BOT_CONTINUE = 0.85
LATENCY_S = 1.0        # model latency before a response appears
SWIPE_S = 0.5          # from a swipe to the next (prefetched) candidate


def swipe_probability(e: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Chance the user swipes this response away for another."""
    judged = 0.03 + 0.67 * (1.0 - quality(e)) ** 1.5
    return np.where(kind == NORMAL, judged, BOT_SWIPE)


def choice_probabilities(e: np.ndarray, shown: np.ndarray, choosiness: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """(n, C) chance of settling on each shown candidate: softmax of engagement; uniform without reading."""
    logits = np.where(shown, np.asarray(choosiness)[:, None] * e, -np.inf)
    logits = np.where((kind == NORMAL)[:, None], logits, np.where(shown, 0.0, -np.inf))
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def vote_probabilities(e: np.ndarray, vote_rate: np.ndarray, kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(thumbs up, thumbs down) chances; no vote otherwise. Skimmers vote at random, bots hardly."""
    q = quality(e)
    up = np.where(kind == NORMAL, vote_rate * q**2, np.where(kind == SKIMMER, 0.15 * vote_rate, 0.01))
    down = np.where(kind == NORMAL, vote_rate * (1.0 - q) ** 2, np.where(kind == SKIMMER, 0.15 * vote_rate, 0.01))
    return up, down


def reading_seconds(n_words: np.ndarray, e: np.ndarray, read_speed: np.ndarray, kind: np.ndarray,
                    noise: np.ndarray, reads: np.ndarray | None = None) -> np.ndarray:
    """Seconds spent on a response: length-driven, longer when engaging; ~0 for skimmers and bots.

    `noise`: standard normal, one per response. `reads` (hard worlds): which responses are read
    rather than glanced at, whatever the kind (default: people read, skimmers and bots glance).
    """
    reader = np.asarray(n_words) / read_speed * (0.6 + 0.8 * quality(e)) * np.exp(0.3 * noise) + 0.4
    glance = np.where(kind == SKIMMER, 0.25, 0.05) * np.exp(0.5 * noise)
    return np.where(kind == NORMAL if reads is None else reads, reader, glance)


def continue_probability(e: np.ndarray, patience: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Chance the user replies to the response they settled on (instead of leaving the conversation)."""
    judged = (0.7 + 0.27 * patience) * (0.3 + 0.7 * quality(e))
    skim = (0.7 + 0.27 * patience) * (0.5 + 0.4 * quality(e))
    return np.where(kind == NORMAL, judged, np.where(kind == SKIMMER, skim, BOT_CONTINUE))


def seconds_to_next_message(e: np.ndarray, message_words: np.ndarray, kind: np.ndarray, noise: np.ndarray,
                            uniform: np.ndarray, mimic: np.ndarray | None = None) -> np.ndarray:
    """Thinking plus typing time before the user's next message; slower after a dull response.

    `noise`: standard normal; `uniform`: uniform on [0, 1); one of each per response. `mimic`
    (hard worlds): bots that wait like a person would, with a person's spread; they read nothing,
    so their wait does not depend on the response.
    """
    if mimic is not None:
        e = np.where(mimic, 0.0, e)
    think = np.exp(np.log(4.0 + 10.0 * (1.0 - quality(e))) + 0.5 * noise)
    typing = np.asarray(message_words) / 0.8
    human = think + typing
    bot = kind == BOT if mimic is None else (kind == BOT) & ~mimic
    return np.where(bot, 1.0 + 2.0 * uniform, human)


def new_conversation_probability(session_quality: np.ndarray, patience: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Chance of starting another conversation in the same session after one ends."""
    return np.where(kind == BOT, 0.5, 0.1 + 0.45 * session_quality * patience)


def report_probability(n_unsafe: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Chance of reporting a response for safety; only readers notice."""
    return np.where((kind == NORMAL) & (np.asarray(n_unsafe) > 0), 0.35, 0.0)


def session_rate(activity: np.ndarray, satisfaction: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Expected sessions per day given recent satisfaction (0..1); bots come back regardless."""
    return np.where(kind == BOT, activity, activity * np.exp(3.0 * (satisfaction - 0.6)))


def return_probability(rate: np.ndarray, days: float) -> np.ndarray:
    """Chance of at least one session within `days` at a constant daily rate."""
    return 1.0 - np.exp(-np.asarray(rate) * days)


def satisfaction_update(satisfaction: np.ndarray, session_quality: np.ndarray, visited: np.ndarray) -> np.ndarray:
    """Moving average of session quality over visits; unchanged on days without one."""
    return np.where(visited, 0.5 * satisfaction + 0.5 * session_quality, satisfaction)


__all__ = [
    "BOT", "NORMAL", "SKIMMER", "WEIGHTS", "Features", "Taste", "Weights", "choice_probabilities",
    "continue_probability", "engagement", "features_from_pieces", "length_fit", "measure",
    "new_conversation_probability", "quality", "reading_seconds", "report_probability", "return_probability",
    "satisfaction_update", "seconds_to_next_message", "session_rate", "swipe_probability", "topic_match",
    "vote_probabilities",
]
