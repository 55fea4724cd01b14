"""What every chat-export adapter shares: one conversation in a neutral form, and its log rows.

An adapter (`openai`, `sharegpt`, `table`) reads its format into `Chat`s, one per record of the
file (a JSONL line, an item of a JSON array, a table row); `converted` turns the `Chat`s of one
ingest's files into log rows that `alignloop.data.ingest.ingest` checks like any other, each row
tagged with the record it came from.

How a `Chat` becomes log rows (the same for every format):

  - users: `user_id` = "ex-u-" + salted sha256 of the export's user id (the raw account id never
    enters the logs); a conversation without one gets a user of its own, hashed from its
    conversation id, so strangers are not lumped into one heavy user (per-user caps, held-out users).
    `first_seen` = the user's earliest conversation among the files of this ingest; a user already
    in the existing tables gets no new row (a later export is not a conflict), so a conversation
    dated before that user's stored `first_seen` is quarantined as out of order.
  - sessions: exports have no visits, so each conversation is a session of its own:
    "<conversation_id>-s", from the conversation's start to its last message. One session per
    conversation keeps ids stable when the same product exports day after day.
  - conversations: `conversation_id` the export's id as given, or "<format>-c-" + sha256 of the
    record's content (so re-ingesting the same export gives the same ids: duplicates, not new rows).
    `character_id` = "ex-ch-" + sha256 of the system prompt (conversations sharing a system prompt
    share a character), `character_name` "assistant", `system_prompt` the leading system messages
    joined by blank lines ("" if none), `model_version` the export's model name or "unknown". A
    conversation that opens with an assistant message (a character's greeting) keeps it as the last
    paragraph of the system prompt, "You opened this conversation with:\n<greeting>", since the
    turns start with the user; a greeting with alternatives or feedback is quarantined.
  - turns: a chain user, assistant, user, ... (the builders read nothing else); turn ids
    "<conversation_id>-<position>-<candidate>". An assistant message with alternatives becomes
    sibling candidates of one parent: candidate indices in the order they were shown, the message's
    own content `selected` (the conversation went on from it), all `shown`.
  - events: `message` per user turn; per assistant message with alternatives, a `swipe` from each
    candidate to the next in shown order and a `select` on the one kept (the DPO builder pairs it
    with the others), and when the one kept was not the last shown, a `swipe` from the last back to
    it (so every candidate not kept was swiped away); `vote` +1 / -1 (0: cleared) where the export
    has thumbs.
  - times: a message without a timestamp is 1 s after the one before it; the first message, without
    one, is at the conversation's start. A conversation without a start begins at its first
    message's time, or at `DEFAULT_START` (2000-01-01T00:00:00Z, an obviously made-up date within
    the plausible range) when nothing in it is dated. Candidates, swipes, selects and votes take their
    message's time. Naive timestamps are UTC, as in `alignloop.data.io`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from alignloop.data.ingest import BAD_JSON, INVALID, TRUNCATED, Converted, IngestError, jsonl_lines
from alignloop.data.schema import LOG_SCHEMAS, utc

SALT = "alignloop-export"
DEFAULT_START = datetime(2000, 1, 1, tzinfo=timezone.utc)
DEFAULT_MODEL = "unknown"
CHARACTER_NAME = "assistant"
STEP = timedelta(seconds=1)


class RecordError(ValueError):
    """A record that cannot become a conversation; the message is its quarantine reason."""


@dataclass(frozen=True)
class Message:
    """One message of a chat; for the assistant, its candidates in the order they were shown."""

    role: str
    text: str
    at: datetime | None = None
    alternatives: tuple[str, ...] = ()
    """the other candidates shown for this message, in the order shown"""
    selected_index: int | None = None
    """where `text` sat among all candidates in shown order; None: last (the one the user stopped at)"""
    vote: int | None = None


@dataclass(frozen=True)
class Chat:
    """One conversation of an export, in no format's terms."""

    messages: tuple[Message, ...]
    conversation_id: str | None = None
    user_id: str | None = None
    started_at: datetime | None = None
    model: str | None = None
    system: tuple[str, ...] = ()
    """system prompt text given beside the messages, put before their leading system messages"""
    where: str = "messages"
    """the record's key for its messages, for reasons"""


@dataclass
class Record:
    """One record of an export file: its line (JSONL), item (JSON array) or row (table), 1-based;
    its parsed JSON; or, when it is not JSON, the quarantine kind and reason."""

    line: int
    data: Any = None
    kind: str | None = None
    reason: str | None = None
    raw: str = ""


@dataclass
class ParsedFile:
    """The chats of one export file and the records that made none: (line, kind, reason, raw)."""

    path: Path
    fmt: str
    raw: Callable[[set[int]], dict[int, str]]
    """the raw text of lines of `path`, for quarantine records"""
    chats: list[tuple[int, Chat, str]] = field(default_factory=list)
    """(line, chat, the record's content hash, for default ids)"""
    rejected: list[tuple[int, str, str, str]] = field(default_factory=list)


def parse_file(path: Path, fmt: str, records: Iterable[Record], parse: Callable[[Any], Chat],
               raw: Callable[[set[int]], dict[int, str]]) -> ParsedFile:
    """`records` parsed by `parse` (a format's record -> `Chat`); every failure kept with its reason."""
    parsed = ParsedFile(path, fmt, raw)
    failed: list[tuple[int, str, str]] = []
    for record in records:
        if record.kind is not None:
            parsed.rejected.append((record.line, record.kind, record.reason or "", record.raw))
            continue
        try:
            chat = parse(record.data)
            check_chain(chat.messages, chat.where)
        except ValidationError as e:
            failed.append((record.line, INVALID, reason_of(e)))
            continue
        except RecordError as e:
            failed.append((record.line, INVALID, str(e)))
            continue
        parsed.chats.append((record.line, chat, content_hash(record.data)))
    raws = raw({line for line, _, _ in failed}) if failed else {}
    parsed.rejected += [(line, kind, reason, raws.get(line, "")) for line, kind, reason in failed]
    parsed.rejected.sort(key=lambda r: r[0])
    return parsed


def jsonl_records(path: Path) -> Iterator[Record]:
    """The records of a JSONL file, one per non-blank line (a UTF-8 BOM is allowed, as in ingest)."""
    for number, raw, line in jsonl_lines(path):
        try:
            yield Record(number, json.loads(line))
        except ValueError as e:
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if raw.endswith(b"\n"):
                yield Record(number, kind=BAD_JSON, reason=f"not JSON: {e}", raw=text)
            else:
                yield Record(number, kind=TRUNCATED, reason=f"last line cut off (no final newline): not JSON: {e}",
                             raw=text)


def jsonl_raw(path: Path) -> Callable[[set[int]], dict[int, str]]:
    def raw(lines: set[int]) -> dict[int, str]:
        found = {}
        with open(path, "rb") as f:
            for number, text in enumerate(f, start=1):
                if number in lines:
                    found[number] = text.decode("utf-8", "replace").rstrip("\r\n")
        return found
    return raw


def json_items(path: Path) -> list[Any]:
    """A JSON file's records: the items of a top-level array, or the file's one object."""
    try:
        data = json.loads(path.read_bytes().removeprefix(codecs.BOM_UTF8))
    except ValueError as e:
        raise IngestError(f"{path}: not JSON: {e}") from None
    return data if isinstance(data, list) else [data]


def item_records(items: Sequence[Any]) -> tuple[list[Record], Callable[[set[int]], dict[int, str]]]:
    """Records of in-memory items (a JSON array, table rows), numbered from 1, and their raw text."""

    def raw(lines: set[int]) -> dict[int, str]:
        return {i: json_text(items[i - 1]) for i in lines if 0 < i <= len(items)}

    return [Record(i, item) for i, item in enumerate(items, start=1)], raw


def json_text(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v))


def digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def content_hash(data: Any) -> str:
    return digest(json.dumps(data, sort_keys=True, ensure_ascii=False, default=str))


def reason_of(e: ValidationError) -> str:
    """One line for a pydantic error: where, then what (as ingest words its reasons)."""
    errors = e.errors(include_url=False)
    first = errors[0]
    loc = list(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("model_type", "dict_type") and not loc:
        return "not a JSON object"
    if loc and loc[-1] == "str" and len(errors) > 1 and list(errors[1]["loc"])[:-1] == loc[:-1]:
        # the two arms of a text field (a string, or text parts) failed alike: one reason, not two
        errors, loc, msg = errors[1:], loc[:-1], "must be a string or a list of text parts"
    where = ".".join(str(p) for p in loc)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"{where}: {msg}" if where else msg) + more


def check_chain(messages: Sequence[Message], where: str = "messages") -> None:
    """Raises `RecordError` unless `messages` are system messages, then user, assistant, user, ..."""
    i = 0
    while i < len(messages) and messages[i].role == "system":
        i += 1
    if i == len(messages):
        raise RecordError("no user or assistant message")
    if messages[i].role == "assistant" and i + 1 < len(messages):
        # A greeting: character chats open with the character's first message. It becomes part of
        # the character's system prompt (`greeting_prompt`); feedback on it would have no turn to sit on.
        if messages[i].alternatives or messages[i].vote is not None:
            raise RecordError(f"{where}.{i}: the opening assistant message (a greeting) has alternatives or "
                              "feedback, which the log schema cannot keep (its turns start with the user)")
        i += 1
    for j, m in enumerate(messages[i:], start=i):
        expected = "user" if (j - i) % 2 == 0 else "assistant"
        if m.role != expected:
            if m.role == "system":
                raise RecordError(f"{where}.{j}: a system message after the conversation began")
            raise RecordError(f"{where}.{j}: expected {'a user' if expected == 'user' else 'an assistant'} message, "
                              f"got {m.role} (the log schema alternates user and assistant, starting with the user)")
        if m.role == "user" and (m.alternatives or m.vote is not None):
            raise RecordError(f"{where}.{j}: only assistant messages have alternatives or feedback")
        if m.selected_index is not None and not 0 <= m.selected_index <= len(m.alternatives):
            raise RecordError(f"{where}.{j}: selected_index {m.selected_index} is not in 0..{len(m.alternatives)}")


def chat_rows(chat: Chat, conversation_id: str, user_id: str) -> tuple[dict[str, list[dict[str, Any]]], datetime]:
    """The session, conversation, turns and events of one chat (`check_chain` passed), and its start."""
    leading = [m.text for m in chat.messages if m.role == "system"]
    system = [*chat.system, *leading]
    body = chat.messages[len(leading):]
    if body and body[0].role == "assistant":
        system.append(greeting_prompt(body[0].text))
        body = body[1:]
    first = next((m.at for m in body if m.at is not None), None)
    start = chat.started_at or first or DEFAULT_START
    cid, sid = conversation_id, f"{conversation_id}-s"
    prompt = "\n\n".join(system)
    rows: dict[str, list[dict[str, Any]]] = {"sessions": [], "conversations": [], "turns": [], "events": []}

    def event(kind: str, turn: str, at: datetime, value: float | None) -> None:
        rows["events"].append({"event_id": f"{turn}-{kind}", "type": kind, "user_id": user_id, "session_id": sid,
                               "conversation_id": cid, "turn_id": turn, "value": value, "text": None,
                               "timestamp": at})

    parent: str | None = None
    at = start
    end = start
    for position, m in enumerate(body):
        at = m.at if m.at is not None else (at + STEP if position else start)
        end = max(end, at)
        if m.role == "user":
            tid = f"{cid}-{position}-0"
            rows["turns"].append(_turn(tid, cid, parent, "user", m.text, position, 0, True, at))
            event("message", tid, at, None)
            parent = tid
            continue
        chosen = len(m.alternatives) if m.selected_index is None else m.selected_index
        shown = list(m.alternatives)
        shown.insert(chosen, m.text)
        ids = [f"{cid}-{position}-{k}" for k in range(len(shown))]
        for k, text in enumerate(shown):
            rows["turns"].append(_turn(ids[k], cid, parent, "assistant", text, position, k, k == chosen, at))
        if len(shown) > 1:
            for k in range(len(shown) - 1):
                event("swipe", ids[k], at, float(k + 1))
            if chosen != len(shown) - 1:  # the user came back to it: every candidate not kept was swiped away
                event("swipe", ids[-1], at, float(chosen))
            event("select", ids[chosen], at, float(chosen))
        if m.vote is not None:
            event("vote", ids[chosen], at, float(m.vote))
        parent = ids[chosen]
    rows["sessions"].append({"session_id": sid, "user_id": user_id, "started_at": start, "ended_at": end})
    rows["conversations"].append({
        "conversation_id": cid, "session_id": sid, "user_id": user_id,
        "character_id": "ex-ch-" + digest(SALT, prompt), "character_name": CHARACTER_NAME, "system_prompt": prompt,
        "model_version": chat.model or DEFAULT_MODEL, "started_at": start})
    return rows, start


def greeting_prompt(text: str) -> str:
    """How an opening assistant message (a character's greeting) enters the system prompt."""
    return f"You opened this conversation with:\n{text}"


def _turn(tid: str, cid: str, parent: str | None, role: str, text: str, position: int, candidate: int,
          selected: bool, at: datetime) -> dict[str, Any]:
    return {"turn_id": tid, "conversation_id": cid, "parent_id": parent, "role": role, "text": text,
            "position": position, "candidate_index": candidate, "shown": True, "selected": selected,
            "created_at": at}


def user_id_of(chat: Chat, conversation_id: str) -> str:
    raw = chat.user_id if chat.user_id is not None else f"conversation\x00{conversation_id}"
    return "ex-u-" + digest(SALT, raw)


def converted(files: Iterable[ParsedFile], known_users: Mapping[str, Any] | Iterable[str] = ()) -> list[Converted]:
    """The log rows of the chats of `files`, one `Converted` per file, for `ingest(converted=...)`.

    Users are gathered across all `files` (one row each, at the file and line of their earliest
    conversation); `known_users` (ids already in the existing tables) get no row.
    """
    files = list(files)
    known = set(known_users)
    relaxed = {name: pa.schema([f.with_nullable(True) for f in schema]) for name, schema in LOG_SCHEMAS.items()}
    made: list[tuple[dict[str, list[dict[str, Any]]], dict[str, list[int]]]] = []
    first: dict[str, tuple[datetime, int, int]] = {}  # user -> (first seen, file, line)
    for f_index, parsed in enumerate(files):
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in LOG_SCHEMAS}
        lines: dict[str, list[int]] = {name: [] for name in LOG_SCHEMAS}
        for line, chat, content in parsed.chats:
            cid = chat.conversation_id if chat.conversation_id is not None else f"{parsed.fmt}-c-{content}"
            uid = user_id_of(chat, cid)
            chat_tables, start = chat_rows(chat, cid, uid)
            for name, items in chat_tables.items():
                rows[name] += items
                lines[name] += [line] * len(items)
            if uid not in first or start < first[uid][0]:
                first[uid] = (start, f_index, line)
        made.append((rows, lines))
    for uid, (start, f_index, line) in first.items():
        if uid not in known:
            made[f_index][0]["users"].append({"user_id": uid, "first_seen": start})
            made[f_index][1]["users"].append(line)
    return [Converted(path=parsed.path, lines=lines, rejected=parsed.rejected, raw=parsed.raw,
                      tables={name: pa.Table.from_pylist(rows[name], schema=relaxed[name]) for name in LOG_SCHEMAS})
            for parsed, (rows, lines) in zip(files, made)]


def to_utc(value: datetime | None) -> datetime | None:
    """Naive datetimes are UTC, as in `alignloop.data.io`."""
    return utc(value) if value is not None else None
