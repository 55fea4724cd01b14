"""Ground-truth scores of response texts: the simulator's engagement for each user's hidden taste.

This is the one function every evaluator calls (held-out evaluation, A/B tests, RL curves): texts
plus who they were for -> engagement and quality. It reads hidden traits, so it belongs to
evaluation only; nothing that trains may call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignloop.sim import engagement as eg


@dataclass
class Scores:
    engagement: np.ndarray   # the user's true utility, one per text
    quality: np.ndarray      # sigmoid(engagement), in (0, 1)
    features: eg.Features    # what the texts were scored on (length, questions, relevance, ...)

    def feature_means(self) -> dict[str, float]:
        """Mean of each scalar feature: what a model changed, in words a reader can check."""
        f = self.features
        return {"words": float(np.mean(f.n_words)), "asks_question": float(np.mean(f.asks_question)),
                "emojis": float(np.mean(f.n_emoji)), "gestures": float(np.mean(f.n_gestures)),
                "relevance": float(np.mean(f.relevance)), "repeat_within": float(np.mean(f.repeat_within)),
                "repeat_across": float(np.mean(f.repeat_across)), "unsafe": float(np.mean(f.n_unsafe > 0))}


def score_texts(texts: Sequence[str], user_texts: Sequence[str], taste: eg.Taste,
                histories: Sequence[Sequence[str]] | None = None) -> Scores:
    """Score `texts[i]` as the answer to `user_texts[i]`, for the user whose taste is row i of `taste`,
    after that conversation's earlier assistant turns `histories[i]` (none: a first answer)."""
    if not len(texts) == len(user_texts) == len(taste.pref_len):
        raise ValueError(f"{len(texts)} texts, {len(user_texts)} user messages, {len(taste.pref_len)} tastes")
    histories = histories if histories is not None else [[] for _ in texts]
    features = eg.measure(list(texts), list(user_texts), histories)
    e = eg.engagement(features, taste)
    return Scores(engagement=e, quality=eg.quality(e), features=features)
