"""The Chit Chat Challenge dataset (PyPI `chitchat-dataset`, BYU PCC lab) as log tables.

What the package ships (version 0.9.0): `chitchat_dataset/dataset.json`, 40 MB, one JSON object
keyed by conversation UUID:

    {"<uuid>": {"messages": [[{"text": ..., "timestamp": "2018-05-02T19:38:15Z", "sender": "<uuid>"},
                              ...],                      # one message: a run of lines by one sender
                             ...],
                "start": "...", "prompt": "<starter question>",              # prompt: 6,929 of them
                "ratings": {"witty": 1-10, "upbeat": 1-10, "interesting": 1-10}}}  # 5,988 of them

7,168 conversations, 138,737 messages, 258,145 lines, 1,315 distinct senders, 2018-04-10 to
2018-11-16. Senders strictly alternate from message to message; 3,150 conversations have a single
message that nobody answered. A rating of 5 is by far the most common on every scale (the
untouched default, it seems); the dataset does not say which participant rated.

How it maps onto the schema:
  - Both sides are people. The one who opens a conversation is the **user** (in a product the user
    writes first and the character answers); the other is the **assistant**. Roles are per
    conversation: 572 people open some conversations and answer others.
  - users: the opening senders; `user_id` = "cc-u-" + salted sha256 of the sender id (the raw id
    never enters the logs); `first_seen` = the start of their first session.
  - characters: the answering person, hashed the same way, is the conversation's `character_id`
    ("cc-nobody" when no one answered); `character_name` "chitchat partner"; `system_prompt` the
    starter question shown to both ("" if none); `model_version` "human:chitchat-dataset".
  - sessions: a user's conversations in time order, less than `session_gap_s` (30 min) from the
    end of one to the start of the next, form one session.
  - conversations: "cc-<uuid>", `started_at` = the first message's time. Not the dataset's `start`:
    in 96% of conversations it is later than the first message by exactly Utah's UTC offset (6 h,
    7 h after DST ended), a local time labelled "Z"; the message times are the true UTC ones
    (their hour-of-day profile has its night-time trough at 2-5 am Utah time).
  - turns: one per message, its lines joined by newlines, created at its first line; a chain
    (each turn's parent is the one before it), no swipes: candidate 0, shown, selected.
  - events: a `message` event per user turn; one `vote` per rated conversation that has an
    assistant turn, on its last assistant turn, timestamped with the conversation's last line:
    mean rating >= `up_at` (6) is +1, <= `down_at` (4) is -1, in between no vote.

Sessions depend on a user's whole history: convert the dataset at once, not in slices to be
ingested one after another (a slice's session ids differ from the full conversion's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignloop.data.io import Format, write_logs
from alignloop.data.schema import LOG_SCHEMAS, VOTE_DOWN, VOTE_UP, conform
from alignloop.errors import AlignloopError

SALT = "alignloop-chitchat"
MODEL_VERSION = "human:chitchat-dataset"
CHARACTER_NAME = "chitchat partner"
NOBODY = "cc-nobody"
SESSION_GAP_S = 1800.0
UP_AT, DOWN_AT = 6.0, 4.0


def dataset_path() -> Path:
    """Where the installed `chitchat-dataset` package keeps its data (found without loading it)."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise AlignloopError("the chitchat adapter needs the `chitchat-dataset` package: pip install chitchat-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset.json"
    if not path.is_file():
        raise AlignloopError(f"chitchat-dataset is installed but {path} is missing")
    return path


def load_chitchat(path: str | Path | None = None) -> dict[str, Any]:
    """The raw dataset: conversation uuid -> {messages, start, prompt?, ratings?}."""
    with open(path or dataset_path(), encoding="utf-8") as f:
        return json.load(f)


def _hash(salt: str, kind: str, raw: str) -> str:
    return f"cc-{kind}-" + hashlib.sha256(f"{salt}\x00{raw}".encode()).hexdigest()[:16]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)  # "2018-05-02T19:38:15Z" -> aware UTC (Python >= 3.11)


def vote_from_ratings(ratings: Mapping[str, float] | None, up_at: float = UP_AT, down_at: float = DOWN_AT) -> int | None:
    """+1 / -1 from a conversation's ratings (mean over scales), or None for no vote."""
    if not ratings:
        return None
    mean = sum(ratings.values()) / len(ratings)
    if mean >= up_at:
        return VOTE_UP
    if mean <= down_at:
        return VOTE_DOWN
    return None


def chitchat_tables(data: Mapping[str, Any] | None = None, *, salt: str = SALT, up_at: float = UP_AT,
                    down_at: float = DOWN_AT, session_gap_s: float = SESSION_GAP_S) -> dict[str, pa.Table]:
    """The five log tables for `data` (default: the whole installed dataset)."""
    if data is None:
        data = load_chitchat()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in LOG_SCHEMAS}
    by_user: dict[str, list[tuple[datetime, datetime, str]]] = {}
    convs: list[tuple[str, dict[str, Any], str, datetime, datetime]] = []
    for key, conv in data.items():
        messages = conv["messages"]
        if not messages:
            continue
        user = _hash(salt, "u", messages[0][0]["sender"])
        first, last = _time(messages[0][0]["timestamp"]), _time(messages[-1][-1]["timestamp"])
        by_user.setdefault(user, []).append((first, last, key))
        convs.append((key, conv, user, first, last))

    session_of: dict[str, str] = {}
    for user, items in by_user.items():
        items.sort()
        session: list[tuple[datetime, datetime, str]] = []

        def close() -> None:
            sid = _hash(salt, "s", f"{user}/{session[0][2]}")
            rows["sessions"].append({"session_id": sid, "user_id": user, "started_at": session[0][0],
                                     "ended_at": max(end for _, end, _ in session)})
            for _, _, k in session:
                session_of[k] = sid

        for item in items:
            if session and (item[0] - max(end for _, end, _ in session)).total_seconds() >= session_gap_s:
                close()
                session = []
            session.append(item)
        close()
        rows["users"].append({"user_id": user, "first_seen": items[0][0]})

    for key, conv, user, first, last in convs:
        cid, sid = f"cc-{key}", session_of[key]
        messages = conv["messages"]
        partner = _hash(salt, "u", messages[1][0]["sender"]) if len(messages) > 1 else NOBODY
        rows["conversations"].append({
            "conversation_id": cid, "session_id": sid, "user_id": user, "character_id": partner,
            "character_name": CHARACTER_NAME, "system_prompt": conv.get("prompt") or "",
            "model_version": MODEL_VERSION, "started_at": first})
        parent = None
        last_assistant = None
        for i, message in enumerate(messages):
            tid = f"{cid}-{i}"
            role = "user" if i % 2 == 0 else "assistant"
            at = _time(message[0]["timestamp"])
            rows["turns"].append({
                "turn_id": tid, "conversation_id": cid, "parent_id": parent, "role": role,
                "text": "\n".join(line["text"] for line in message), "position": i, "candidate_index": 0,
                "shown": True, "selected": True, "created_at": at})
            if role == "user":
                rows["events"].append({"event_id": f"{tid}-message", "type": "message", "user_id": user,
                                       "session_id": sid, "conversation_id": cid, "turn_id": tid, "value": None,
                                       "text": None, "timestamp": at})
            else:
                last_assistant = tid
            parent = tid
        vote = vote_from_ratings(conv.get("ratings"), up_at, down_at)
        if vote is not None and last_assistant is not None:
            rows["events"].append({"event_id": f"{cid}-vote", "type": "vote", "user_id": user, "session_id": sid,
                                   "conversation_id": cid, "turn_id": last_assistant, "value": float(vote),
                                   "text": None, "timestamp": last})
    return {name: conform(name, pa.Table.from_pylist(rows[name], schema=schema))
            for name, schema in LOG_SCHEMAS.items()}


def write_chitchat(folder: str | Path, data: Mapping[str, Any] | None = None, format: Format = "parquet",
                   **options: Any) -> list[Path]:
    """Convert the dataset (default: all of it) into a log folder that `ingest` reads like any other."""
    return write_logs(folder, chitchat_tables(data, **options), format=format)
