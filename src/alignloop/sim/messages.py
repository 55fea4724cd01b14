"""Users write messages whose style leaks their hidden traits, so a policy can learn to personalise.

A message is a row of piece ids (see `lexicon`): 1-4 sentences about words from the user's
favourite topics, more of them for users who like long answers; a question for users who like
questions; a gesture (*grins*) for role-players; an emoji for emoji lovers. Bots do not write:
they replay a few fixed scripts (`bot_scripts`), identical across conversations.
"""

from __future__ import annotations

import numpy as np

from alignloop.sim.lexicon import N_WORDS, PIECES, WORDS_PER_TOPIC
from alignloop.sim.traits import Population

WIDTH = 7  # gesture, up to 4 sentences, question, emoji


def uniform_ints(rng: np.random.Generator, high: int, shape) -> np.ndarray:
    """Uniform integers in [0, high): faster than `Generator.integers` for many small draws."""
    return (rng.random(shape) * high).astype(np.int64)


def topic_words(rng: np.random.Generator, topics: np.ndarray, k: int) -> np.ndarray:
    """(n, k) content word ids: each a random word of a topic drawn from that row's interests."""
    cumulative = np.cumsum(topics, axis=1)
    u = rng.random((topics.shape[0], k)) * cumulative[:, -1:]
    topic = (u[:, :, None] > cumulative[:, None, :]).sum(axis=2)
    return topic * WORDS_PER_TOPIC + uniform_ints(rng, WORDS_PER_TOPIC, (topics.shape[0], k))


def write_messages(rng: np.random.Generator, pop: Population, rows: np.ndarray) -> np.ndarray:
    """(len(rows), WIDTH) piece ids (-1: nothing in that place): one new message for each user row."""
    n = len(rows)
    if n == 0:
        return np.full((0, WIDTH), -1, dtype=np.int32)
    pref = pop.pref_len[rows]
    n_sentences = np.clip(np.rint(pref / 35.0 + rng.normal(0.0, 0.6, n)), 1, 4).astype(np.int64)
    words = topic_words(rng, pop.topics[rows], 5)
    out = np.full((n, WIDTH), -1, dtype=np.int64)

    gesture = rng.random(n) < 0.03 + 0.8 * np.maximum(pop.gesture_taste[rows], 0.0)
    out[:, 0] = np.where(gesture, PIECES.first("gesture") + uniform_ints(rng, PIECES.count("gesture"), n), -1)

    slot = PIECES.first("user_slot") + uniform_ints(rng, PIECES.count("user_slot") // N_WORDS, (n, 4)) * N_WORDS
    out[:, 1:5] = np.where(np.arange(4)[None, :] < n_sentences[:, None], slot + words[:, :4], -1)
    # A short greeting sometimes stands in for the first sentence.
    plain = rng.random(n) < 0.08
    out[plain, 1] = PIECES.first("user_plain") + uniform_ints(rng, PIECES.count("user_plain"), int(plain.sum()))

    question = rng.random(n) < 0.15 + 0.5 * np.maximum(pop.question_taste[rows], 0.0)
    q_template = uniform_ints(rng, PIECES.count("user_question_slot") // N_WORDS, n)
    out[:, 5] = np.where(question, PIECES.first("user_question_slot") + q_template * N_WORDS + words[:, 4], -1)

    emoji = rng.random(n) < 0.03 + 0.8 * np.maximum(pop.emoji_taste[rows], 0.0)
    out[:, 6] = np.where(emoji, PIECES.first("emoji") + uniform_ints(rng, PIECES.count("emoji"), n), -1)
    return out.astype(np.int32)


def bot_scripts(rng: np.random.Generator, pop: Population, scripts: int = 3) -> np.ndarray:
    """(pop.n, scripts, WIDTH): the fixed messages each user would replay if it is a bot."""
    rows = np.repeat(np.arange(pop.n), scripts)
    return write_messages(rng, pop, rows).reshape(pop.n, scripts, WIDTH)


def content_ids(pieces: np.ndarray) -> np.ndarray:
    """Content word id of every piece (-1 for padding and pieces without one)."""
    return PIECES.word[pieces]
