"""Ground-truth tables: what the simulator knows and the logs never show.

Written to `ground_truth/` beside `logs/`, keyed by the same ids, for evaluation only (filter
precision and recall, reward-model quality, A/B estimates). Nothing here may feed training.

    users       hidden traits: kind (normal / bot / skimmer), tastes, topic interests, activity, ...
    candidates  every assistant turn, shown or not: true engagement, quality, swipe and continue
                probabilities, and the measured features the engagement was computed from
    sessions    mean quality of the answers settled on, and the chance of returning within 1 / 7 days
"""

from __future__ import annotations

import pyarrow as pa

from alignloop.sim.lexicon import TOPIC_NAMES


def _f(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, type_, nullable=False, metadata={"doc": doc})


USERS_TRUTH = pa.schema([
    _f("user_id", pa.string(), "-> logs users.user_id"),
    _f("kind", pa.string(), "normal, bot or skimmer"),
    _f("is_bot", pa.bool_(), "repeats scripted messages, picks at random, never reads"),
    _f("is_skimmer", pa.bool_(), "picks without reading"),
    _f("pref_len", pa.float32(), "preferred response length, words"),
    _f("question_taste", pa.float32(), "-1..1 liking for follow-up questions"),
    _f("emoji_taste", pa.float32(), "-1..1 liking for emojis"),
    _f("gesture_taste", pa.float32(), "-1..1 liking for *gestures*"),
    _f("topic_interest", pa.list_(pa.float32()), "interest per topic, in order: " + ", ".join(TOPIC_NAMES)),
    _f("favourite_topic", pa.string(), "the topic of highest interest"),
    _f("activity", pa.float32(), "mean sessions per day when satisfied"),
    _f("patience", pa.float32(), "0..1"),
    _f("read_speed", pa.float32(), "words per second"),
    _f("vote_rate", pa.float32(), "propensity to give thumbs"),
    _f("choosiness", pa.float32(), "inverse temperature of the choice among candidates"),
])

CANDIDATES_TRUTH = pa.schema([
    _f("turn_id", pa.string(), "-> logs turns.turn_id (assistant)"),
    _f("user_id", pa.string(), "the user it was (or would have been) shown to"),
    _f("engagement", pa.float32(), "the user's true utility for it"),
    _f("quality", pa.float32(), "sigmoid(engagement)"),
    _f("p_swipe", pa.float32(), "chance the user swipes it away when it is shown"),
    _f("p_continue", pa.float32(), "chance the user replies if they settle on it"),
    _f("n_words", pa.int32(), "feature: words"),
    _f("asks_question", pa.bool_(), "feature: contains a question"),
    _f("n_emoji", pa.int32(), "feature: emojis"),
    _f("n_gestures", pa.int32(), "feature: *gestures*"),
    _f("relevance", pa.float32(), "feature: share of the user's content words picked up"),
    _f("topic_match", pa.float32(), "feature x taste: interest-weighted topic words"),
    _f("repeat_within", pa.float32(), "feature: share of repeated sentences inside it"),
    _f("repeat_across", pa.float32(), "feature: share of its sentences said earlier in the conversation"),
    _f("n_unsafe", pa.int32(), "feature: unsafe words"),
])

SESSIONS_TRUTH = pa.schema([
    _f("session_id", pa.string(), "-> logs sessions.session_id"),
    _f("user_id", pa.string(), "-> logs users.user_id"),
    _f("quality", pa.float32(), "mean quality of the answers the user settled on"),
    _f("p_return_1d", pa.float32(), "chance of another session within a day, after this day's experience"),
    _f("p_return_7d", pa.float32(), "the same within 7 days"),
])

TRUTH_SCHEMAS: dict[str, pa.Schema] = {
    "users": USERS_TRUTH,
    "candidates": CANDIDATES_TRUTH,
    "sessions": SESSIONS_TRUTH,
}


if __name__ == "__main__":
    from alignloop.data.schema import markdown_tables

    print(markdown_tables(TRUTH_SCHEMAS), end="")
