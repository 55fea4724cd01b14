"""The product API the chat UI (and any app) talks to, and what each call writes to the log store.

    POST /api/signup                an anonymous account: {user_id, api_key}
    GET  /api/characters            who one can talk to
    POST /api/conversations         start one with a character (the user's A/B version is fixed here)
    GET  /api/conversations[/{id}]  the user's own conversations, and one with its turns
    POST /api/conversations/{id}/messages   the user's message; answered with candidate 0
    POST /api/turns/{id}/candidates the next alternative for a user turn (swipe right, regenerate)
    POST /api/events                read / swipe / select / vote / edit / report, stored before the 200
    POST /api/logs                  whole log rows from a trusted producer (an ingest key): the
                                    simulated users' clients, another product's log shipper

A user only ever sees their own conversations: another user's id answers 404, exactly like an id
that does not exist, so ids cannot be probed. A malformed event batch gets 422 naming the first
bad event and nothing of it is written. The rows are those of `alignloop.data.schema`: a user turn
and its `message` event when the message arrives (before any generation, so a crash mid-answer
loses no user action), each assistant candidate when it is generated, the user's events when
they are posted.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from alignloop.data.schema import LOG_SCHEMAS, ROW_MODELS
from alignloop.serve.server import Server, key_hash
from alignloop.serve.store import now_ms
from alignloop.sim.traits import CHARACTERS

CHARACTER = {c.id: c for c in CHARACTERS}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewConversation(Strict):
    character_id: str


class NewMessage(Strict):
    text: str = Field(..., min_length=1)
    parent_id: str | None = None


class Event(Strict):
    type: Literal["read", "swipe", "select", "vote", "edit", "report"]
    conversation_id: str
    turn_id: str
    value: float | None = None
    text: str | None = None
    event_id: str | None = Field(None, min_length=1, max_length=128,
                                 description="client-chosen id: re-sending the same event is a no-op")


class Events(Strict):
    events: list[Event] = Field(..., min_length=1)


class LogRows(Strict):
    users: list[dict] = []
    sessions: list[dict] = []
    conversations: list[dict] = []
    turns: list[dict] = []
    events: list[dict] = []


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    recipe, limits = server.recipe, server.recipe.limits
    authed = Depends(server.user_of)  # the caller's user id, or 401/429

    @routes.post("/api/signup")
    async def signup(request: Request):
        who = request.client.host if request.client else "unknown"
        if not server.signups.allow(who):
            raise HTTPException(429, "too many sign-ups from this address; retry later", headers={"Retry-After": "60"})
        key = f"al-{secrets.token_urlsafe(24)}"
        # The logs' user id is a salted hash of the account, never the key or an account number.
        user_id = "u-" + hashlib.sha256(f"{recipe.serve.salt}:{uuid.uuid4()}".encode()).hexdigest()[:16]
        await run_in_threadpool(server.store.add_account, user_id, key_hash(key), now_ms())
        return {"user_id": user_id, "api_key": key}

    @routes.get("/api/characters")
    async def characters():
        return [{"id": c.id, "name": c.name, "description": c.description} for c in CHARACTERS]

    @routes.post("/api/conversations")
    async def new_conversation(body: NewConversation, user: str = authed):
        character = CHARACTER.get(body.character_id)
        if character is None:
            raise HTTPException(422, f"unknown character '{body.character_id}' (GET /api/characters)")
        at = now_ms()
        session = await run_in_threadpool(server.store.session, user, at, int(recipe.serve.session_gap_s * 1000))
        row = {"conversation_id": f"c-{uuid.uuid4().hex}", "session_id": session, "user_id": user,
               "character_id": character.id, "character_name": character.name,
               "system_prompt": character.system_prompt, "model_version": server.version_for(user),
               "started_at": at}
        await run_in_threadpool(server.store.write, {"conversations": [row]})
        return {k: row[k] for k in ("conversation_id", "model_version", "character_id", "character_name")}

    def own(conversation_id: str, user: str) -> dict:
        c = server.store.conversation(conversation_id)
        if c is None or c["user_id"] != user:
            raise HTTPException(404, f"no conversation '{conversation_id}'")
        return c

    @routes.get("/api/conversations")
    async def list_conversations(user: str = authed):
        rows = await run_in_threadpool(server.store.conversations_of, user)
        return [{"conversation_id": r["conversation_id"], "character_name": r["character_name"],
                 "character_id": r["character_id"], "started_at": r["started_at"]} for r in rows]

    @routes.get("/api/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, user: str = authed):
        c = await run_in_threadpool(own, conversation_id, user)
        turns = await run_in_threadpool(server.store.turns_of, conversation_id)
        return {"conversation_id": conversation_id, "character_id": c["character_id"],
                "character_name": c["character_name"], "model_version": c["model_version"],
                "turns": [{k: t[k] for k in ("turn_id", "parent_id", "role", "text", "candidate_index")}
                          | {"shown": bool(t["shown"]), "selected": bool(t["selected"])} for t in turns]}

    async def answer(conversation: dict, user_turn: dict, index: int, turns: dict[str, dict]) -> dict:
        """Generate candidate `index` for `user_turn` and store it (shown: candidate 0 is on screen
        at once; later ones when a swipe event says so). `turns`: the conversation's turns by id,
        as the caller already read them."""
        path, node = [], user_turn
        while node is not None:
            path.append(node)
            node = turns.get(node["parent_id"]) if node["parent_id"] else None
        messages = [{"role": "system", "content": conversation["system_prompt"]}]
        messages += [{"role": t["role"], "content": t["text"]} for t in reversed(path)]
        backend = server.backends.get(conversation["model_version"])
        if backend is None:
            raise HTTPException(503, f"model version '{conversation['model_version']}' is no longer served")
        prompt = backend.encode(messages)
        while backend.online.problem(prompt) is not None and len(messages) > 2:
            del messages[1:3]  # drop the oldest exchange until the conversation fits the context
            prompt = backend.encode(messages)
        if (why := backend.online.problem(prompt)) is not None:
            raise HTTPException(400, why)
        completion = await backend.generate(prompt, server.params())
        row = {"turn_id": f"t-{uuid.uuid4().hex}", "conversation_id": conversation["conversation_id"],
               "parent_id": user_turn["turn_id"], "role": "assistant", "text": completion.text.strip(),
               "position": user_turn["position"], "candidate_index": index, "shown": index == 0,
               "selected": index == 0, "created_at": now_ms()}
        await run_in_threadpool(server.store.write, {"turns": [row]})
        return {"turn_id": row["turn_id"], "text": row["text"], "candidate_index": index}

    @routes.post("/api/conversations/{conversation_id}/messages")
    async def post_message(conversation_id: str, body: NewMessage, user: str = authed):
        if len(body.text) > limits.max_message_chars:
            raise HTTPException(413, f"message over {limits.max_message_chars} characters")
        c = await run_in_threadpool(own, conversation_id, user)
        turns = await run_in_threadpool(server.store.turns_of, conversation_id)
        by_id = {t["turn_id"]: t for t in turns}
        if body.parent_id is None:
            if turns:
                raise HTTPException(422, "parent_id is required after the first message: the assistant turn "
                                         "this message answers")
            position = 0
        else:
            parent = by_id.get(body.parent_id)
            if parent is None or parent["role"] != "assistant":
                raise HTTPException(422, f"parent_id '{body.parent_id}' is not an assistant turn of this conversation")
            position = parent["position"] + 1
        at = now_ms()
        await run_in_threadpool(server.store.session, user, at, int(recipe.serve.session_gap_s * 1000))
        turn = {"turn_id": f"t-{uuid.uuid4().hex}", "conversation_id": conversation_id, "parent_id": body.parent_id,
                "role": "user", "text": body.text, "position": position, "candidate_index": 0, "shown": True,
                "selected": True, "created_at": at}
        event = {"event_id": f"e-{uuid.uuid4().hex}", "type": "message", "user_id": user,
                 "session_id": c["session_id"], "conversation_id": conversation_id, "turn_id": turn["turn_id"],
                 "value": None, "text": None, "timestamp": at}
        updates = []
        if body.parent_id is not None:
            # Answering a candidate is going on from it: it becomes the selected one of its siblings.
            p = by_id[body.parent_id]
            updates = [("UPDATE turns SET selected = (turn_id = ?) WHERE parent_id = ? AND role = 'assistant'",
                        (p["turn_id"], p["parent_id"]))]
        await run_in_threadpool(server.store.write, {"turns": [turn], "events": [event]}, updates)
        candidate = await answer(c, turn, 0, by_id)
        return {"user_turn": {"turn_id": turn["turn_id"], "text": turn["text"]}, "candidate": candidate}

    @routes.post("/api/turns/{turn_id}/candidates")
    async def new_candidate(turn_id: str, user: str = authed):
        turn = await run_in_threadpool(server.store.turn, turn_id)
        c = None if turn is None else await run_in_threadpool(server.store.conversation, turn["conversation_id"])
        if turn is None or c is None or c["user_id"] != user:
            raise HTTPException(404, f"no turn '{turn_id}'")
        if turn["role"] != "user":
            raise HTTPException(422, "alternatives are generated for a user turn (the assistant turn's parent_id)")
        turns = {t["turn_id"]: t for t in await run_in_threadpool(server.store.turns_of, c["conversation_id"])}
        siblings = [t for t in turns.values() if t["parent_id"] == turn_id]
        return await answer(c, turn, len(siblings), turns)

    @routes.post("/api/events")
    async def post_events(body: Events, user: str = authed):
        if len(body.events) > limits.max_events_per_request:
            raise HTTPException(413, f"{len(body.events)} events: at most {limits.max_events_per_request} per request")
        rows, updates = await run_in_threadpool(_validate_events, server, body.events, user)
        await run_in_threadpool(server.store.write, {"events": rows}, updates)
        return {"event_ids": [r["event_id"] for r in rows]}

    @routes.post("/api/logs")
    async def post_logs(body: LogRows, request: Request):
        header = request.headers.get("authorization", "")
        if key_hash(header.removeprefix("Bearer ").strip()) not in server.ingest_keys:
            raise HTTPException(403, "posting log rows needs an ingest key (serve.ingest_keys)")
        rows = await run_in_threadpool(_validate_rows, body)
        written = await run_in_threadpool(server.store.write, rows)
        return {"rows": sum(len(v) for v in rows.values()), "new": written}

    return routes


def _validate_rows(body: LogRows) -> dict[str, list[dict]]:
    """Rows checked by the log schema's row models (422 naming the first bad one; nothing written)."""
    out: dict[str, list[dict]] = {}
    for table, model in ROW_MODELS.items():
        if table not in LOG_SCHEMAS:
            continue
        rows = []
        for i, raw in enumerate(getattr(body, table)):
            try:
                row = model.model_validate(raw).model_dump()
            except ValidationError as e:
                first = e.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "row"
                raise HTTPException(422, f"{table}[{i}].{where}: {first['msg']}") from None
            rows.append({k: (int(v.timestamp() * 1000) if isinstance(v, datetime) else v) for k, v in row.items()})
        out[table] = rows
    return out


def _validate_events(server: Server, events: list[Event], user: str) -> tuple[list[dict], list]:
    """Log rows and turn updates for a batch, or an HTTPException (nothing of the batch is written)."""
    limit = server.recipe.limits.max_message_chars
    conversations: dict[str, dict] = {}
    turns: dict[str, dict[str, dict]] = {}
    rows, updates = [], []
    at = now_ms()
    for i, e in enumerate(events):
        where = f"event {i} ({e.type})"
        if e.conversation_id not in conversations:
            c = server.store.conversation(e.conversation_id)
            if c is None or c["user_id"] != user:
                raise HTTPException(404, f"{where}: no conversation '{e.conversation_id}'")
            conversations[e.conversation_id] = c
            turns[e.conversation_id] = {t["turn_id"]: t for t in server.store.turns_of(e.conversation_id)}
        turn = turns[e.conversation_id].get(e.turn_id)
        if turn is None or turn["role"] != "assistant":
            raise HTTPException(422, f"{where}: '{e.turn_id}' is not an assistant turn of this conversation")
        siblings = {t["candidate_index"]: t for t in turns[e.conversation_id].values()
                    if t["parent_id"] == turn["parent_id"] and t["role"] == "assistant"}
        value, text = e.value, e.text
        if e.type in ("swipe", "select"):
            if value is None or value != int(value) or int(value) not in siblings:
                raise HTTPException(422, f"{where}: value must be the candidate_index of an existing alternative "
                                         f"({sorted(siblings)}), got {value}")
            if e.type == "select" and int(value) != turn["candidate_index"]:
                raise HTTPException(422, f"{where}: value {value} is not the candidate_index of '{e.turn_id}'")
            chosen = siblings[int(value)]["turn_id"]
            updates.append(("UPDATE turns SET selected = (turn_id = ?) WHERE parent_id = ? AND role = 'assistant'",
                            (chosen, turn["parent_id"])))
            updates.append(("UPDATE turns SET shown = ? WHERE turn_id = ?", (True, chosen)))
        elif e.type == "vote":
            if value not in (-1, 0, 1):
                raise HTTPException(422, f"{where}: value must be +1, -1 or 0, got {value}")
        elif e.type == "read":
            if value is None or not 0 <= value <= 86_400:
                raise HTTPException(422, f"{where}: value must be the seconds read, 0..86400, got {value}")
        elif e.type in ("edit", "report"):
            if not text or len(text) > limit:
                raise HTTPException(422, f"{where}: text must be 1..{limit} characters")
        if e.type not in ("edit", "report") and text is not None:
            raise HTTPException(422, f"{where}: only edit and report events carry text")
        rows.append({"event_id": e.event_id or f"e-{uuid.uuid4().hex}", "type": e.type, "user_id": user,
                     "session_id": conversations[e.conversation_id]["session_id"],
                     "conversation_id": e.conversation_id, "turn_id": e.turn_id,
                     "value": None if value is None else float(value), "text": text, "timestamp": at})
    return rows, updates

