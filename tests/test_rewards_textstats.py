"""Text statistics of a (context, response) pair: each feature on texts where its value is known."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from alignloop.rewards.textstats import NAMES, _emoji, stats, stats_matrix


def feature(context, response, name):
    return float(stats(context, response)[NAMES.index(name)])


def test_emoji_counts_symbols_only():
    assert _emoji("plain ascii, no symbols :)") == 0
    assert _emoji("café naïve") == 0  # letters outside ASCII are not symbols
    assert _emoji("hi 😀 there ☺ ♥") == 3
    assert feature([], "😀😀😀😀😀", "emoji") == 3  # capped


@given(st.text(max_size=40))
def test_emoji_agrees_with_a_scan_of_every_character(text):
    import unicodedata
    assert _emoji(text) == sum(1 for ch in text if ord(ch) > 0x2000 and unicodedata.category(ch) == "So")


def test_features_of_a_known_pair():
    context = [{"role": "user", "content": "tell me about ramen noodles"},
               {"role": "assistant", "content": "Ramen is great."},
               {"role": "user", "content": "which ramen broth is best?"}]
    response = "Ramen broth? Tonkotsu broth is rich. Ramen is great. *smiles*"
    assert feature(context, response, "question") == 1.0
    assert feature(context, response, "gestures") == 1.0
    # The user's words over 3 letters: which, ramen, broth, best; the answer uses ramen and broth.
    assert feature(context, response, "overlap") == 0.5
    assert feature(context, response, "repeat_across") > 0  # "ramen is great." was said before
    assert stats_matrix([context], [response]).shape == (1, len(NAMES))
    assert np.isfinite(stats_matrix([context], [response])).all()
