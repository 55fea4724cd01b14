"""The user-log schema: what a chat product records, as Arrow tables (Parquet on disk) or JSONL.

Five log tables, plus one table of labels derived from them later. Every id is a string; every
timestamp is UTC with millisecond precision (JSONL: ISO 8601, e.g. "2026-01-05T09:30:00.000+00:00").

    users          one row per user: user_id (hashed, never the raw account id), first_seen
    sessions       one visit to the product: session_id, user_id, started_at, ended_at
    conversations  one chat with one character, inside a session: conversation_id, session_id,
                   user_id, character_id, character_name, system_prompt, model_version, started_at
    turns          the messages, as a tree: each turn points at its parent. A user turn's parent is
                   the assistant turn it answers (null for the first); an assistant turn's parent is
                   the user turn it answers. Swipes are siblings: all assistant candidates for one
                   user turn share that parent and differ in candidate_index (0 = shown first).
                   `shown`: the user saw it (prefetched candidates may never be shown);
                   `selected`: the candidate the conversation went on from (exactly one per parent).
                   `position` is the depth in the tree (0 = first user turn), so siblings share it.
    events         what the user did, one row per action, with a unique event_id so that ingesting
                   the same events twice is a no-op. `type` is one of EVENT_TYPES:
                     message  sent the user turn `turn_id`             value: null
                     read     read assistant turn `turn_id`            value: seconds
                     swipe    swiped away from `turn_id`               value: candidate_index shown next
                     select   settled on `turn_id` after swiping       value: its candidate_index
                     vote     thumbs on `turn_id`                      value: +1 up, -1 down, 0 none (cleared)
                     edit     rewrote assistant turn `turn_id`         text: the new text
                     report   reported `turn_id` (safety)              text: the reason
                   A read event's timestamp is when reading ended; the others, when they happened.
    labels         derived (see `alignloop.data.labels`), one row per selected assistant turn:
                   continued (the user replied), turns_after (user turns after it in the conversation),
                   time_to_next_user_message (seconds; null when there is none: censored),
                   returned_1d / returned_7d (a new session of the user within 1 / 7 days of the
                   turn; null when the log ends before the horizon and no return was seen: censored).

Each column's meaning also travels with the schema, as field metadata ("doc"), and `docs/logs.md`
is generated from it (`python -m alignloop.data.schema`), so there is one place to change.

Row models (`ROW_MODELS`, pydantic) validate single rows at the boundary (ingest, tests, small
hand-made logs); bulk paths build Arrow tables directly and pass them through `conform`.

`Plausible` holds the bounds past which a well-typed value is taken for a logging bug rather than
a fact (timestamps of year 1 or 9999, a swipe to candidate 1e20); ingest quarantines such rows,
and rows that happened before the user, session or conversation they belong to began.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import pyarrow as pa
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

TIMESTAMP = pa.timestamp("ms", tz="UTC")

EVENT_TYPES = ("message", "read", "swipe", "select", "vote", "edit", "report")
ROLES = ("system", "user", "assistant")
VOTE_UP, VOTE_DOWN, VOTE_NONE = 1, -1, 0

EventType = Literal["message", "read", "swipe", "select", "vote", "edit", "report"]
Role = Literal["system", "user", "assistant"]


def doc_field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    """A schema field that carries its meaning as metadata ("doc"), from which the docs are generated."""
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


USERS = pa.schema([
    doc_field("user_id", pa.string(), "hashed user id (salted hash; the raw account id never enters the logs)"),
    doc_field("first_seen", TIMESTAMP, "start of the user's first session"),
])

SESSIONS = pa.schema([
    doc_field("session_id", pa.string(), "unique session id"),
    doc_field("user_id", pa.string(), "-> users.user_id"),
    doc_field("started_at", TIMESTAMP, "first action of the session"),
    doc_field("ended_at", TIMESTAMP, "last action of the session"),
])

CONVERSATIONS = pa.schema([
    doc_field("conversation_id", pa.string(), "unique conversation id"),
    doc_field("session_id", pa.string(), "-> sessions.session_id"),
    doc_field("user_id", pa.string(), "-> users.user_id"),
    doc_field("character_id", pa.string(), "the character (persona) the user chats with"),
    doc_field("character_name", pa.string(), "its display name"),
    doc_field("system_prompt", pa.string(), "the character's system prompt"),
    doc_field("model_version", pa.string(), "the deployed model that wrote the assistant turns"),
    doc_field("started_at", TIMESTAMP, "when the conversation started"),
])

TURNS = pa.schema([
    doc_field("turn_id", pa.string(), "unique turn id"),
    doc_field("conversation_id", pa.string(), "-> conversations.conversation_id"),
    doc_field("parent_id", pa.string(), "the turn this one answers; null for the first turn", nullable=True),
    doc_field("role", pa.string(), "one of: " + ", ".join(ROLES)),
    doc_field("text", pa.string(), "the message text"),
    doc_field("position", pa.int32(), "depth in the tree: 0 = first turn; sibling candidates share it"),
    doc_field("candidate_index", pa.int32(), "order among sibling candidates (swipes); 0 for user turns"),
    doc_field("shown", pa.bool_(), "the user saw this turn (a prefetched candidate may never be shown)"),
    doc_field("selected", pa.bool_(), "the candidate the conversation continued from; one per parent"),
    doc_field("created_at", TIMESTAMP, "when the turn was sent (user) or shown / generated (assistant)"),
])

EVENTS = pa.schema([
    doc_field("event_id", pa.string(), "unique event id; re-ingesting an event with a known id is a no-op"),
    doc_field("type", pa.string(), "one of: " + ", ".join(EVENT_TYPES)),
    doc_field("user_id", pa.string(), "-> users.user_id"),
    doc_field("session_id", pa.string(), "-> sessions.session_id"),
    doc_field("conversation_id", pa.string(), "-> conversations.conversation_id"),
    doc_field("turn_id", pa.string(), "-> turns.turn_id, the turn acted on", nullable=True),
    doc_field("value", pa.float64(), "read: seconds; swipe/select: candidate_index; vote: +1/-1/0", nullable=True),
    doc_field("text", pa.string(), "edit: the new text; report: the reason", nullable=True),
    doc_field("timestamp", TIMESTAMP, "when it happened (read: when reading ended)"),
])

LABELS = pa.schema([
    doc_field("turn_id", pa.string(), "-> turns.turn_id, a selected assistant turn"),
    doc_field("conversation_id", pa.string(), "-> conversations.conversation_id"),
    doc_field("user_id", pa.string(), "-> users.user_id"),
    doc_field("continued", pa.bool_(), "the user sent another message after this turn"),
    doc_field("turns_after", pa.int32(), "user turns after this one in the conversation"),
    doc_field("time_to_next_user_message", pa.float64(),
       "seconds from this turn to the user's reply; null if none (censored)", nullable=True),
    doc_field("returned_1d", pa.bool_(), "a new session within 1 day; null if the log ends first (censored)",
       nullable=True),
    doc_field("returned_7d", pa.bool_(), "a new session within 7 days; null if the log ends first (censored)",
       nullable=True),
])

LOG_SCHEMAS: dict[str, pa.Schema] = {
    "users": USERS,
    "sessions": SESSIONS,
    "conversations": CONVERSATIONS,
    "turns": TURNS,
    "events": EVENTS,
}
"""The tables a product writes, in dependency order."""

DERIVED_SCHEMAS: dict[str, pa.Schema] = {"labels": LABELS}

SCHEMAS: dict[str, pa.Schema] = {**LOG_SCHEMAS, **DERIVED_SCHEMAS}


STARTS: dict[str, str] = {"users": "first_seen", "sessions": "started_at", "conversations": "started_at"}
"""When a user, session or conversation began: nothing that belongs to it can happen earlier."""

WHEN: dict[str, str] = {"sessions": "started_at", "conversations": "started_at", "turns": "created_at",
                        "events": "timestamp"}
"""The time of a row, compared with the beginnings (`STARTS`) of the rows it belongs to."""


@dataclass(frozen=True)
class Plausible:
    """Bounds of plausible log values; ingest quarantines a row outside them (one reason per rule).

    The defaults fit any chat product's logs; a product with older logs (or a simulated world set
    in the future) passes its own to `alignloop.data.ingest.ingest`.
    """

    earliest: datetime = datetime(2000, 1, 1, tzinfo=timezone.utc)
    """No timestamp before: 1970-01-01 is an unset clock, year 1 a default value, not a visit."""
    future: timedelta = timedelta(days=1)
    """No timestamp later than the ingest's start plus this: a day covers clock skew and time zones."""
    max_candidate_index: int = 1000
    """No swipe/select value or turn candidate_index above: nobody swipes through a thousand replies."""


class SchemaError(ValueError):
    """A table that does not fit its schema (missing column, wrong type, null in a required column)."""


def conform(name: str, table: pa.Table, schemas: Mapping[str, pa.Schema] = SCHEMAS) -> pa.Table:
    """`table` with exactly the columns of schema `name`, in order, cast to their types.

    Extra columns are an error, not silently dropped: a ground-truth column leaking into a log
    table must fail loudly.
    """
    if name not in schemas:
        raise SchemaError(f"unknown table '{name}' (known: {', '.join(schemas)})")
    schema = schemas[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"table '{name}': missing columns {missing}, unexpected columns {extra}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        try:
            column = column.cast(field.type) if column.type != field.type else column
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            where = f"table '{name}', column '{field.name}'"
            raise SchemaError(f"{where}: {column.type} is not {field.type}: {e}") from None
        if not field.nullable and column.null_count:
            where = f"table '{name}', column '{field.name}'"
            raise SchemaError(f"{where}: {column.null_count} null(s) in a required column")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def empty(name: str, schemas: Mapping[str, pa.Schema] = SCHEMAS) -> pa.Table:
    return schemas[name].empty_table()


# --- row models --------------------------------------------------------------------------------


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class User(_Row):
    user_id: str = Field(min_length=1)
    first_seen: AwareDatetime


class Session(_Row):
    session_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    started_at: AwareDatetime
    ended_at: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Session:
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        return self


class Conversation(_Row):
    conversation_id: str = Field(min_length=1)
    session_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    character_id: str
    character_name: str
    system_prompt: str
    model_version: str
    started_at: AwareDatetime


class Turn(_Row):
    turn_id: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1)
    parent_id: str | None
    role: Role
    text: str
    position: int = Field(ge=0, lt=2**31)
    candidate_index: int = Field(ge=0, lt=2**31)
    shown: bool
    selected: bool
    created_at: AwareDatetime

    @model_validator(mode="after")
    def _tree(self) -> Turn:
        if self.parent_id == self.turn_id:
            raise ValueError("a turn cannot be its own parent")
        if self.role == "user" and self.candidate_index != 0:
            raise ValueError("user turns have candidate_index 0")
        return self


class Event(_Row):
    event_id: str = Field(min_length=1)
    type: EventType
    user_id: str = Field(min_length=1)
    session_id: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1)
    turn_id: str | None
    value: float | None
    text: str | None
    timestamp: AwareDatetime

    @model_validator(mode="after")
    def _value_fits_type(self) -> Event:
        problem = event_value_problem(self.type, self.value)
        if problem:
            raise ValueError(problem)
        if self.turn_id is None and self.type != "message":
            raise ValueError(f"a {self.type} event needs a turn_id")
        return self


class Label(_Row):
    turn_id: str = Field(min_length=1)
    conversation_id: str = Field(min_length=1)
    user_id: str = Field(min_length=1)
    continued: bool
    turns_after: int = Field(ge=0, lt=2**31)
    time_to_next_user_message: float | None = Field(None, ge=0)
    returned_1d: bool | None
    returned_7d: bool | None


def event_value_problem(type_: str, value: float | None) -> str | None:
    """Why `value` does not fit an event of `type_`, or None if it does."""
    if value is not None and not math.isfinite(value):
        return f"{type_} event: value must be finite, got {value}"
    if type_ == "read" and (value is None or value < 0):
        return f"read event: value must be seconds >= 0, got {value}"
    if type_ in ("swipe", "select") and (value is None or value < 0 or value != int(value)):
        return f"{type_} event: value must be a candidate index, got {value}"
    if type_ == "vote" and value not in (VOTE_UP, VOTE_DOWN, VOTE_NONE):
        return f"vote event: value must be +1, -1 or 0, got {value}"
    return None


ROW_MODELS: dict[str, type[_Row]] = {
    "users": User,
    "sessions": Session,
    "conversations": Conversation,
    "turns": Turn,
    "events": Event,
    "labels": Label,
}


def rows_to_table(name: str, rows: Iterable[_Row | Mapping[str, Any]]) -> pa.Table:
    """Validate rows (models or dicts) with the row model of table `name`; return the Arrow table.

    Raises `SchemaError` naming the first bad row and what is wrong with it.
    """
    model = ROW_MODELS[name]
    dumped = []
    for i, row in enumerate(rows):
        try:
            item = row if isinstance(row, model) else model.model_validate(row)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SchemaError(f"table '{name}', row {i}: {where + ': ' if where else ''}{first['msg']}") from None
        dumped.append(item.model_dump())
    return pa.Table.from_pylist(dumped, schema=SCHEMAS[name])


def table_to_rows(name: str, table: pa.Table) -> list[_Row]:
    """The rows of `table` as row models (timestamps come back as aware UTC datetimes)."""
    model = ROW_MODELS[name]
    return [model.model_validate(row) for row in conform(name, table).to_pylist()]


def utc(ts: datetime) -> datetime:
    """`ts` as an aware UTC datetime (naive datetimes are taken to be UTC)."""
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


# --- documentation -----------------------------------------------------------------------------


def markdown_tables(schemas: Mapping[str, pa.Schema] = SCHEMAS) -> str:
    """One markdown table per schema: column, type, required, meaning. `docs/logs.md` embeds it."""
    out = []
    for name, schema in schemas.items():
        out.append(f"### `{name}`\n\n| column | type | required | meaning |\n|---|---|---|---|")
        for field in schema:
            doc = (field.metadata or {}).get(b"doc", b"").decode()
            kind = "timestamp (ms, UTC)" if field.type == TIMESTAMP else str(field.type)
            out.append(f"| `{field.name}` | {kind} | {'no' if field.nullable else 'yes'} | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_tables(), end="")
