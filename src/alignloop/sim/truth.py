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

from alignloop.data.schema import doc_field, markdown_tables
from alignloop.sim.lexicon import TOPIC_NAMES


USERS_TRUTH = pa.schema([
    doc_field("user_id", pa.string(), "-> logs users.user_id"),
    doc_field("kind", pa.string(), "normal, bot or skimmer"),
    doc_field("is_bot", pa.bool_(), "repeats scripted messages, picks at random, never reads"),
    doc_field("is_skimmer", pa.bool_(), "picks without reading"),
    doc_field("pref_len", pa.float32(), "preferred response length, words"),
    doc_field("question_taste", pa.float32(), "-1..1 liking for follow-up questions"),
    doc_field("emoji_taste", pa.float32(), "-1..1 liking for emojis"),
    doc_field("gesture_taste", pa.float32(), "-1..1 liking for *gestures*"),
    doc_field("topic_interest", pa.list_(pa.float32()), "interest per topic, in order: " + ", ".join(TOPIC_NAMES)),
    doc_field("favourite_topic", pa.string(), "the topic of highest interest"),
    doc_field("activity", pa.float32(), "mean sessions per day when satisfied"),
    doc_field("patience", pa.float32(), "0..1"),
    doc_field("read_speed", pa.float32(), "words per second"),
    doc_field("vote_rate", pa.float32(), "propensity to give thumbs"),
    doc_field("choosiness", pa.float32(), "inverse temperature of the choice among candidates"),
])

CANDIDATES_TRUTH = pa.schema([
    doc_field("turn_id", pa.string(), "-> logs turns.turn_id (assistant)"),
    doc_field("user_id", pa.string(), "the user it was (or would have been) shown to"),
    doc_field("engagement", pa.float32(), "the user's true utility for it"),
    doc_field("quality", pa.float32(), "sigmoid(engagement)"),
    doc_field("p_swipe", pa.float32(), "chance the user swipes it away when it is shown"),
    doc_field("p_continue", pa.float32(), "chance the user replies if they settle on it"),
    doc_field("n_words", pa.int32(), "feature: words"),
    doc_field("asks_question", pa.bool_(), "feature: contains a question"),
    doc_field("n_emoji", pa.int32(), "feature: emojis"),
    doc_field("n_gestures", pa.int32(), "feature: *gestures*"),
    doc_field("relevance", pa.float32(), "feature: share of the user's content words picked up"),
    doc_field("topic_match", pa.float32(), "feature x taste: interest-weighted topic words"),
    doc_field("repeat_within", pa.float32(), "feature: share of repeated sentences inside it"),
    doc_field("repeat_across", pa.float32(), "feature: share of its sentences said earlier in the conversation"),
    doc_field("n_unsafe", pa.int32(), "feature: unsafe words"),
])

SESSIONS_TRUTH = pa.schema([
    doc_field("session_id", pa.string(), "-> logs sessions.session_id"),
    doc_field("user_id", pa.string(), "-> logs users.user_id"),
    doc_field("quality", pa.float32(), "mean quality of the answers the user settled on"),
    doc_field("p_return_1d", pa.float32(), "chance of another session within a day, after this day's experience"),
    doc_field("p_return_7d", pa.float32(), "the same within 7 days"),
])

TRUTH_SCHEMAS: dict[str, pa.Schema] = {
    "users": USERS_TRUTH,
    "candidates": CANDIDATES_TRUTH,
    "sessions": SESSIONS_TRUTH,
}


if __name__ == "__main__":
    print(markdown_tables(TRUTH_SCHEMAS), end="")
