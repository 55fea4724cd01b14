"""Surface statistics of a (context, response) pair that a frozen sentence embedding hardly sees.

A mean-pooled, normalised embedding says what an answer is about, but little about how long it is
next to the user's message, whether it repeats itself or the conversation, or how much of the
user's wording it picks up; users react to all of these. Computed from the text alone (no user
id, nothing from the simulator), in plain Python because no library computes this combination.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_WORD = re.compile(r"[A-Za-z']+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]?")
_GESTURE = re.compile(r"\*[^*]{1,40}\*")

NAMES = ("log_words", "log_user_words", "log_len_ratio", "question", "emoji", "gestures", "overlap",
         "repeat_within", "repeat_across", "log_context")
DIM = len(NAMES)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _sentences(text: str) -> list[str]:
    return [s.strip().lower() for s in _SENTENCE.findall(text) if len(s.strip()) > 3]


def _emoji(text: str) -> int:
    if text.isascii():  # most answers: one C-level scan instead of a Python step per character
        return 0
    return sum(1 for ch in text if ord(ch) > 0x2000 and unicodedata.category(ch) == "So")


def last_user(context: list[dict]) -> str:
    for m in reversed(context):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""


def stats(context: list[dict], response: str) -> np.ndarray:
    user = last_user(context)
    rw, uw = _words(response), _words(user)
    content = {w for w in uw if len(w) > 3}
    sents = _sentences(response)
    earlier = {s for m in context if m.get("role") == "assistant" for s in _sentences(m.get("content") or "")}
    return np.array([
        np.log1p(len(rw)),
        np.log1p(len(uw)),
        np.log((len(rw) + 1) / (len(uw) + 1)),
        float("?" in response),
        min(_emoji(response), 3),
        min(len(_GESTURE.findall(response)), 3),
        len(content & set(rw)) / len(content) if content else 0.0,
        1 - len(set(sents)) / len(sents) if sents else 0.0,
        sum(s in earlier for s in sents) / len(sents) if sents else 0.0,
        np.log1p(len(context)),
    ], dtype=np.float32)


def stats_matrix(contexts: list[list[dict]], responses: list[str]) -> np.ndarray:
    if not responses:
        return np.zeros((0, DIM), dtype=np.float32)
    return np.stack([stats(c, r) for c, r in zip(contexts, responses, strict=True)])
