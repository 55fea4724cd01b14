"""Rule metrics of a set of responses: cheap, deterministic, and hard to fool in the ways RMs are.

Each is a plain function of the texts (and, for repetition across turns, the conversation's earlier
assistant turns): length, distinct-n (share of unique n-grams over all responses: low means the
model says the same things to everyone), repetition inside a response (repeated word 3-grams) and
across turns (3-grams already said earlier in the conversation), question rate, emoji and
gesture rates, and the unsafe rate (a word list; the default is the simulated world's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from alignloop.sim.lexicon import EMOJI_RE, GESTURE_RE, UNSAFE

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Unique n-grams / all n-grams over every response (0 when there are none)."""
    total, unique = 0, set()
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def repetition_within(text: str, n: int = 3) -> float:
    """Share of a response's word n-grams that already occurred earlier in the same response."""
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_across(text: str, earlier: Sequence[str], n: int = 3) -> float:
    """Share of a response's word n-grams that an earlier assistant turn of the conversation already had."""
    grams = ngrams(words(text), n)
    if not grams or not earlier:
        return 0.0
    seen = {g for e in earlier for g in ngrams(words(e), n)}
    return sum(g in seen for g in grams) / len(grams)


@dataclass(frozen=True)
class RuleMetrics:
    n: int
    mean_words: float
    distinct_1: float
    distinct_2: float
    repetition_within: float
    repetition_across: float
    question_rate: float
    emoji_rate: float
    gesture_rate: float
    unsafe_rate: float
    empty_rate: float

    def to_json(self) -> dict:
        return asdict(self)


def rule_metrics(texts: Sequence[str], histories: Sequence[Sequence[str]] | None = None,
                 unsafe_words: frozenset[str] = UNSAFE) -> RuleMetrics:
    """All rule metrics over `texts`; `histories[i]`: earlier assistant turns of text i's conversation."""
    n = len(texts)
    if n == 0:
        raise ValueError("rule metrics of no responses")
    histories = histories if histories is not None else [()] * n
    if len(histories) != n:
        raise ValueError(f"{n} texts but {len(histories)} histories")
    tokens = [words(t) for t in texts]

    def mean(values: Iterable[float]) -> float:
        return sum(values) / n

    return RuleMetrics(
        n=n,
        mean_words=mean(len(t) for t in tokens),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        repetition_within=mean(repetition_within(t) for t in texts),
        repetition_across=mean(repetition_across(t, h) for t, h in zip(texts, histories)),
        question_rate=mean("?" in t for t in texts),
        emoji_rate=mean(bool(EMOJI_RE.search(t)) for t in texts),
        gesture_rate=mean(bool(GESTURE_RE.search(t)) for t in texts),
        unsafe_rate=mean(any(w in unsafe_words for w in ws) for ws in tokens),
        empty_rate=mean(not t.strip() for t in texts),
    )
