"""The deployed model in the simulated world: anything that answers a batch of conversations.

`TemplateResponder` composes answers from the piece table with controlled variation (length,
questions, emojis, gestures, picking up the user's words, the character's topic, occasional
repetition and unsafe text): hundreds of thousands of answers per second on a CPU, and their
features come from table lookups. `EngineResponder` answers with a real model through
`alignloop.engine.Engine.chat`; its answers are scored by `engagement.measure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.sim.config import EngineResponderSection, TemplateSection
from alignloop.sim.lexicon import N_TOPICS, N_WORDS, PIECES, WORDS_PER_TOPIC
from alignloop.sim.messages import uniform_ints
from alignloop.sim.traits import CHARACTERS, Character

MAX_BODY = 24                   # sentences
WIDTH = 2 + MAX_BODY + 1 + 2    # gestures, body, question, emojis
WORDS_PER_SENTENCE = 8.0


@dataclass
class Context:
    """What the model sees for a batch of conversations, one row each."""

    characters: np.ndarray       # index into `CHARACTERS`
    user_pieces: np.ndarray      # the user's new message as piece ids (-1 padded)
    user_words: np.ndarray       # its content word ids (-1 padded)
    previous: np.ndarray         # piece ids of the last answer the user settled on (-1: none)
    user_texts: list[str] | None = None      # the new message as text (when a responder needs text)
    history: list[list[dict]] | None = None  # chat messages before the new one (when a responder needs text)

    def __len__(self) -> int:
        return len(self.characters)

    def take(self, rows: np.ndarray) -> Context:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                out[f.name] = value[rows]
            elif value is not None:
                out[f.name] = [value[i] for i in rows.tolist()]
            else:
                out[f.name] = None
        return Context(**out)

    def conversations(self, characters: Sequence[Character] = CHARACTERS) -> list[list[dict]]:
        """Chat messages (system prompt, history, new user message) per row."""
        history = self.history if self.history is not None else [[] for _ in range(len(self))]
        if self.user_texts is None:
            raise ValueError("this context carries no texts; the world keeps them only for responders with needs_text")
        return [
            [{"role": "system", "content": characters[c].system_prompt}, *h, {"role": "user", "content": u}]
            for c, h, u in zip(self.characters.tolist(), history, self.user_texts, strict=True)
        ]


@dataclass
class Responses:
    """Answers, as texts, or as pieces (features by lookup; texts rendered when first asked for)."""

    texts: pa.StringArray | list[str] | None = None
    pieces: np.ndarray | None = None  # (n, WIDTH)

    def __post_init__(self) -> None:
        if self.texts is None and self.pieces is None:
            raise ValueError("Responses need texts or pieces")

    def text_list(self) -> list[str]:
        if self.texts is None:
            self.texts = PIECES.render(self.pieces)
        return self.texts if isinstance(self.texts, list) else self.texts.to_pylist()


@runtime_checkable
class Responder(Protocol):
    model_version: str
    needs_text: bool  # True: the world must keep chat histories as text for it

    def respond(self, ctx: Context, rng: np.random.Generator) -> Responses: ...


class TemplateResponder:
    """Fast answers from templates; every knob of `TemplateSection` is a per-response rate."""

    needs_text = False

    def __init__(self, style: TemplateSection | None = None, model_version: str = "template-v1",
                 characters: Sequence[Character] = CHARACTERS):
        self.style = style or TemplateSection()
        self.model_version = model_version
        self.topic = np.array([c.topic for c in characters])
        self.roleplay = np.array([c.roleplay for c in characters])
        self.emoji_style = np.array([c.emoji for c in characters])

    def respond(self, ctx: Context, rng: np.random.Generator) -> Responses:
        pieces = self.compose(ctx, rng)
        return Responses(pieces=pieces)

    def compose(self, ctx: Context, rng: np.random.Generator) -> np.ndarray:
        """(n, WIDTH) piece ids: [2 gestures | MAX_BODY sentences | question | 2 emojis], -1 where empty."""
        s, n = self.style, len(ctx)
        length = np.exp(rng.normal(np.log(s.length_median), s.length_sigma, n))
        n_body = np.clip(np.rint(length / WORDS_PER_SENTENCE), 1, MAX_BODY).astype(np.int64)
        # The body is built flat (one entry per sentence of any row): rows are short on average.
        starts = np.cumsum(n_body) - n_body
        row = np.repeat(np.arange(n), n_body)
        col = np.arange(row.size) - starts[row]

        # Slot words: the user's words it picks up (in the message's order), else words of the
        # character's topic, else a sentence without one.
        m = min(ctx.user_words.shape[1], MAX_BODY)
        echo = np.where(rng.random((n, m)) < s.echo, ctx.user_words[:, :m], -1)
        word = np.where(col < m, echo[row, np.minimum(col, m - 1)], -1)
        topic = self.topic[ctx.characters]
        topic = np.where(topic >= 0, topic, uniform_ints(rng, N_TOPICS, n))
        topic_word = topic * WORDS_PER_TOPIC + uniform_ints(rng, WORDS_PER_TOPIC, n)
        u = rng.random(row.size)
        on_topic = np.flatnonzero((word < 0) & (u < s.topic))
        # u < s.topic, so u / s.topic is again uniform: it picks the word.
        pick = (u[on_topic] / max(s.topic, 1e-12) * WORDS_PER_TOPIC).astype(np.int64)
        word[on_topic] = topic[row[on_topic]] * WORDS_PER_TOPIC + pick
        # Templates are drawn without replacement within an answer (the k-th sentence of a kind
        # takes the k-th template of the row's own shuffle), so an answer repeats a sentence only
        # when `repeat_within` says so: drawn with replacement, 16 fillers would collide in about
        # a third of the answers.
        n_slot = PIECES.count("bot_slot") // N_WORDS
        n_plain = PIECES.count("bot_plain")
        # There are only so many fillers: a long answer's further sentences are about its topic.
        plain_rank = _rank_in_row(word < 0, starts, row)
        overflow = np.flatnonzero((word < 0) & (plain_rank >= n_plain))
        shift = uniform_ints(rng, WORDS_PER_TOPIC, n)[row[overflow]] + plain_rank[overflow]
        word[overflow] = topic[row[overflow]] * WORDS_PER_TOPIC + shift % WORDS_PER_TOPIC
        slot = word >= 0
        # Past 16 slot sentences the templates come round again: sentence k + 16 shares sentence k's
        # template, so it must not share its word too (the next word of the topic instead), or the
        # answer repeats a sentence that `repeat_within` never asked for.
        slot_at = np.flatnonzero(slot)
        wrapped = np.flatnonzero(_rank_in_row(slot, starts, row)[slot_at] >= n_slot)
        again, first = slot_at[wrapped], slot_at[wrapped - n_slot]
        same = again[word[again] == word[first]]
        word[same] = word[same] // WORDS_PER_TOPIC * WORDS_PER_TOPIC + (word[same] % WORDS_PER_TOPIC + 1) % WORDS_PER_TOPIC
        slot_template = np.argsort(rng.random((n, n_slot)), axis=1)
        plain_template = np.argsort(rng.random((n, n_plain)), axis=1)
        body = np.where(
            slot,
            PIECES.first("bot_slot") + slot_template[row, _rank_in_row(slot, starts, row) % n_slot] * N_WORDS + word,
            PIECES.first("bot_plain") + plain_template[row, _rank_in_row(~slot, starts, row) % n_plain],
        )
        unsafe = np.flatnonzero(rng.random(n) < s.unsafe)
        at = starts[unsafe] + (rng.random(unsafe.size) * n_body[unsafe]).astype(np.int64)
        body[at] = PIECES.first("bot_unsafe") + uniform_ints(rng, PIECES.count("bot_unsafe"), unsafe.size)
        twice = np.flatnonzero((rng.random(n) < s.repeat_within) & (n_body >= 2))
        body[starts[twice] + n_body[twice] - 1] = body[starts[twice]]

        # A follow-up question about a word it picked up, else about its topic, sometimes generic.
        picked = echo.max(axis=1)  # any picked-up word will do
        about = np.where(picked >= 0, picked, topic_word)
        n_q = PIECES.count("bot_question_slot") // N_WORDS
        question = np.where(
            rng.random(n) < 0.75,
            PIECES.first("bot_question_slot") + uniform_ints(rng, n_q, n) * N_WORDS + about,
            PIECES.first("bot_question_plain") + uniform_ints(rng, PIECES.count("bot_question_plain"), n),
        )
        question = np.where(rng.random(n) < s.question, question, -1)

        def decorations(kind: str, rate: np.ndarray) -> np.ndarray:
            u = rng.random(n)
            ids = PIECES.first(kind) + uniform_ints(rng, PIECES.count(kind), (n, 2))
            some = u < np.clip(rate, 0.0, 1.0)
            return np.where(np.stack([some, some & (u < 0.3 * rate)], axis=1), ids, -1)

        gestures = decorations("gesture", s.gesture * self.roleplay[ctx.characters])
        emojis = decorations("emoji", s.emoji * self.emoji_style[ctx.characters])
        out = np.full((n, WIDTH), -1, dtype=np.int64)
        out[:, :2] = gestures
        out[row, 2 + col] = body
        out[:, 2 + MAX_BODY] = question
        out[:, 3 + MAX_BODY :] = emojis

        # Degenerate repetition: the previous answer again, word for word.
        again = np.flatnonzero((rng.random(n) < s.repeat) & (ctx.previous.max(axis=1) >= 0))
        out[again] = ctx.previous[again]
        return out.astype(np.int32)


def _rank_in_row(mask: np.ndarray, starts: np.ndarray, row: np.ndarray) -> np.ndarray:
    """For flat entries grouped by row (row-major, `starts` = each row's first entry): how many
    entries of the row before this one have `mask` set."""
    before = np.cumsum(mask) - mask
    return before - before[starts][row]


class EngineResponder:
    """A real model answers (any zoo model or checkpoint), one seeded sample per request."""

    needs_text = True

    def __init__(self, engine, max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                 model_version: str = "engine", characters: Sequence[Character] = CHARACTERS):
        self.engine = engine
        self.params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.model_version = model_version
        self.characters = characters

    @classmethod
    def from_section(cls, section: EngineResponderSection, model_version: str) -> EngineResponder:
        engine = Engine.from_name(section.model, seed=section.seed, dtype=section.dtype,
                                  max_batch=section.max_batch, show_progress=False)
        return cls(engine, section.max_tokens, section.temperature, section.top_p, model_version)

    def respond(self, ctx: Context, rng: np.random.Generator) -> Responses:
        if len(ctx) == 0:
            return Responses([])
        seeds = rng.integers(0, 2**31 - 1, len(ctx)).tolist()
        params = [replace(self.params, seed=seed) for seed in seeds]
        completions = self.engine.chat(ctx.conversations(self.characters), params)
        return Responses([c.text.strip() for c in completions])


def make_responder(section) -> Responder:
    """The responder a `ResponderSection` describes."""
    if section.kind == "template":
        return TemplateResponder(section.template, section.version())
    return EngineResponder.from_section(section.engine, section.version())
