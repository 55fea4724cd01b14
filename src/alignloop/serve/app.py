"""The server: the OpenAI-compatible API, the product API the chat UI talks to, and the UI itself.

    GET  /                          the chat UI (static files, no build step)
    GET  /v1/models                 the deployed versions
    POST /v1/chat/completions       OpenAI chat completions: n (swipes), stream (SSE), stop,
                                    logprobs, tools (rendered and parsed by the chat layer)
    POST /api/signup                an anonymous account: {user_id, api_key}
    GET  /api/characters            who one can talk to
    POST /api/conversations         start one with a character (the user's A/B version is fixed here)
    GET  /api/conversations[/{id}]  the user's own conversations, and one with its turns
    POST /api/conversations/{id}/messages   the user's message; answered with candidate 0
    POST /api/turns/{id}/candidates the next alternative for a user turn (swipe right, regenerate)
    POST /api/events                read / swipe / select / vote / edit / report, stored before the 200
    POST /api/logs                  whole log rows from a trusted producer (an ingest key): the
                                    simulated users' clients, another product's log shipper

Every /v1 and /api call but signup and characters needs `Authorization: Bearer <key>`: a key from
signup, or one of the recipe's static keys (401 otherwise). A user only ever sees their own
conversations: another user's id answers 404, exactly like an id that does not exist, so ids
cannot be probed. Bodies over `limits.max_body_bytes` get 413 before they are read whole; a
malformed event batch gets 422 and nothing of it is written; more than `requests_per_minute`
gets 429.

The log rows written here are those of `alignloop.data.schema`: a user turn and its `message`
event when the message arrives (before any generation, so a crash mid-answer loses no user
action), each assistant candidate when it is generated, the user's events when they are posted.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections import defaultdict, deque
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from alignloop.data.schema import LOG_SCHEMAS, ROW_MODELS
from alignloop.engine.api import SamplingParams
from alignloop.serve.backends import ModelBackend, assign
from alignloop.serve.config import ServeRecipe
from alignloop.serve.store import LogStore, now_ms
from alignloop.sim.traits import CHARACTERS

STATIC = Path(__file__).parent / "static"
CHARACTER = {c.id: c for c in CHARACTERS}


# ---- request bodies -------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send name, tool_call_id, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    logprobs: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    user: str | None = None


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


# ---- plumbing -----------------------------------------------------------------------------------
def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class RateLimiter:
    """At most `per_minute` calls per caller in any sliding minute (in memory, per server process)."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.calls: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, who: str) -> bool:
        now = time.monotonic()
        q = self.calls[who]
        while q and now - q[0] > 60:
            q.popleft()
        if len(q) >= self.per_minute:
            return False
        q.append(now)
        return True


class BodyLimit:
    """413 for a body over `limit` bytes, from Content-Length or counted as it streams in (ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(send, self.limit)
        seen, answered = 0, False

        async def counted():
            # Over the limit mid-stream: answer 413 now and tell the app the client went away;
            # whatever the app then sends is dropped.
            nonlocal seen, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                answered = True
                await _too_large(send, self.limit)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not answered:
                await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not answered:
                raise


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Server:
    """What the routes share: the recipe, the store, the model versions, the limiters."""

    def __init__(self, recipe: ServeRecipe, backends: dict[str, ModelBackend] | None = None,
                 store: LogStore | None = None):
        self.recipe = recipe
        self.store = store or LogStore(recipe.serve.store)
        self.backends = backends if backends is not None else {
            m.version: ModelBackend.from_section(m, recipe.serve) for m in recipe.models}
        self.versions = [m.version for m in recipe.models]
        self.shares = [m.share for m in recipe.models]
        self.static_keys = {key_hash(k): f"k-{key_hash(k)[:16]}" for k in recipe.serve.api_keys}
        self.ingest_keys = {key_hash(k) for k in recipe.serve.ingest_keys}
        self.limiter = RateLimiter(recipe.limits.requests_per_minute)
        self.signups = RateLimiter(recipe.limits.signups_per_minute)

    def user_of(self, request: Request) -> str:
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not key:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'",
                                headers={"WWW-Authenticate": "Bearer"})
        h = key_hash(key)
        user = self.static_keys.get(h) or self.store.user_for_key(h)
        if user is None:
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        if not self.limiter.allow(user):
            raise HTTPException(429, f"over {self.limiter.per_minute} requests per minute; retry later",
                                headers={"Retry-After": "60"})
        return user

    def version_for(self, user: str) -> str:
        return assign(user, self.versions, self.shares)

    def params(self, max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
               seed: int | None = None, stop: tuple[str, ...] = ()) -> SamplingParams:
        g = self.recipe.generation
        return SamplingParams(temperature=g.temperature if temperature is None else temperature,
                              top_p=g.top_p if top_p is None else top_p,
                              max_tokens=min(max_tokens or g.max_tokens, self.recipe.serve.context - 1),
                              stop=stop, seed=seed)

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.store.close()


def create_app(recipe: ServeRecipe, backends: dict[str, ModelBackend] | None = None,
               store: LogStore | None = None) -> FastAPI:
    """The ASGI app; `backends`/`store` replace the recipe's (tests pass tiny models, a temp store)."""
    server = Server(recipe, backends, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="alignloop", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=recipe.limits.max_body_bytes)
    limits = recipe.limits
    authed = Depends(server.user_of)  # the caller's user id, or 401/429

    # ---- the UI ----------------------------------------------------------------------------
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.exists():
            raise HTTPException(404, "the chat UI is not installed")
        return FileResponse(page)

    @app.get("/healthz", include_in_schema=False)
    async def healthz():
        return {"ok": True, "versions": server.versions}

    # ---- OpenAI API --------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(user: str = authed):
        return {"object": "list", "data": [{"id": v, "object": "model", "owned_by": "alignloop", "created": 0}
                                           for v in server.versions]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, user: str = authed):
        if body.n > limits.max_n:
            raise HTTPException(422, f"n = {body.n}: at most {limits.max_n} choices per request")
        version = body.model if body.model not in (None, "", "default") else server.version_for(user)
        if version not in server.backends:
            raise HTTPException(404, f"model '{version}' is not served here (GET /v1/models)")
        backend = server.backends[version]
        tools = body.tools if body.tool_choice != "none" else None
        if tools and (backend.family is None or backend.family.tool_calls is None):
            raise HTTPException(400, f"model '{version}' has no tool-call format in its chat template "
                                     f"({backend.family.name if backend.family else 'unknown family'}): "
                                     "it cannot be offered tools")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        try:
            prompt = backend.encode(messages, tools)
        except Exception as e:  # noqa: BLE001 - the template refused these messages: the caller's input
            raise HTTPException(422, f"the chat template cannot render these messages: {e}") from None
        if (why := backend.online.problem(prompt)) is not None:
            raise HTTPException(400, why)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        base = server.params(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p,
                             body.seed, stop)
        # Choice i is seeded (seed, i): a request with a seed is reproducible, and its swipes differ.
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        params = [replace(base, seed=(seed * 1009 + i) % (2**31 - 1)) for i in range(body.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": version}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(backend, prompt, params, tools, head, body.logprobs, usage),
                                     media_type="text/event-stream")
        import asyncio

        completions = await asyncio.gather(*(backend.generate(prompt, p) for p in params))
        choices = []
        for i, c in enumerate(completions):
            message = backend.parse(c.text, tools)
            choice = {"index": i, "message": _openai_message(message), "finish_reason": _finish(c, message)}
            choice["logprobs"] = _logprobs(backend, c) if body.logprobs else None
            choices.append(choice)
        used = sum(len(c.token_ids) for c in completions)
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": used,
                          "total_tokens": len(prompt) + used}}

    # ---- product API -------------------------------------------------------------------------
    @app.post("/api/signup")
    async def signup(request: Request):
        who = request.client.host if request.client else "unknown"
        if not server.signups.allow(who):
            raise HTTPException(429, "too many sign-ups from this address; retry later", headers={"Retry-After": "60"})
        key = f"al-{secrets.token_urlsafe(24)}"
        # The logs' user id is a salted hash of the account, never the key or an account number.
        user_id = "u-" + hashlib.sha256(f"{recipe.serve.salt}:{uuid.uuid4()}".encode()).hexdigest()[:16]
        await run_in_threadpool(server.store.add_account, user_id, key_hash(key), now_ms())
        return {"user_id": user_id, "api_key": key}

    @app.get("/api/characters")
    async def characters():
        return [{"id": c.id, "name": c.name, "description": c.description} for c in CHARACTERS]

    @app.post("/api/conversations")
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

    @app.get("/api/conversations")
    async def list_conversations(user: str = authed):
        rows = await run_in_threadpool(server.store.conversations_of, user)
        return [{"conversation_id": r["conversation_id"], "character_name": r["character_name"],
                 "character_id": r["character_id"], "started_at": r["started_at"]} for r in rows]

    @app.get("/api/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, user: str = authed):
        c = await run_in_threadpool(own, conversation_id, user)
        turns = await run_in_threadpool(server.store.turns_of, conversation_id)
        return {"conversation_id": conversation_id, "character_id": c["character_id"],
                "character_name": c["character_name"], "model_version": c["model_version"],
                "turns": [{k: t[k] for k in ("turn_id", "parent_id", "role", "text", "candidate_index")}
                          | {"shown": bool(t["shown"]), "selected": bool(t["selected"])} for t in turns]}

    async def answer(conversation: dict, user_turn: dict, index: int, user: str) -> dict:
        """Generate candidate `index` for `user_turn` and store it (shown: candidate 0 is on screen
        at once; later ones when a swipe event says so)."""
        turns = {t["turn_id"]: t for t in await run_in_threadpool(server.store.turns_of, conversation["conversation_id"])}
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

    @app.post("/api/conversations/{conversation_id}/messages")
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
        candidate = await answer(c, turn, 0, user)
        return {"user_turn": {"turn_id": turn["turn_id"], "text": turn["text"]}, "candidate": candidate}

    @app.post("/api/turns/{turn_id}/candidates")
    async def new_candidate(turn_id: str, user: str = authed):
        turn = await run_in_threadpool(server.store.turn, turn_id)
        c = None if turn is None else await run_in_threadpool(server.store.conversation, turn["conversation_id"])
        if turn is None or c is None or c["user_id"] != user:
            raise HTTPException(404, f"no turn '{turn_id}'")
        if turn["role"] != "user":
            raise HTTPException(422, "alternatives are generated for a user turn (the assistant turn's parent_id)")
        siblings = [t for t in await run_in_threadpool(server.store.turns_of, c["conversation_id"])
                    if t["parent_id"] == turn_id]
        return await answer(c, turn, len(siblings), user)

    @app.post("/api/events")
    async def post_events(body: Events, user: str = authed):
        if len(body.events) > limits.max_events_per_request:
            raise HTTPException(413, f"{len(body.events)} events: at most {limits.max_events_per_request} per request")
        rows, updates = await run_in_threadpool(_validate_events, server, body.events, user)
        await run_in_threadpool(server.store.write, {"events": rows}, updates)
        return {"event_ids": [r["event_id"] for r in rows]}

    @app.post("/api/logs")
    async def post_logs(body: LogRows, request: Request):
        header = request.headers.get("authorization", "")
        if key_hash(header.removeprefix("Bearer ").strip()) not in server.ingest_keys:
            raise HTTPException(403, "posting log rows needs an ingest key (serve.ingest_keys)")
        rows = await run_in_threadpool(_validate_rows, body)
        written = await run_in_threadpool(server.store.write, rows)
        return {"rows": sum(len(v) for v in rows.values()), "new": written}

    return app


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


# ---- OpenAI response pieces ---------------------------------------------------------------------
def _openai_message(message: dict) -> dict:
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [{"id": c.get("id") or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": json.dumps(c["function"]["arguments"])}}
                             for c in calls]
    return out


def _finish(completion, message: dict) -> str:
    if message.get("tool_calls"):
        return "tool_calls"
    return completion.finish_reason


def _logprobs(backend: ModelBackend, completion) -> dict:
    tok = backend.tokenizer
    content = []
    for t, lp in zip(completion.token_ids, completion.logprobs):
        piece = tok.decode([t])
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []})
    return {"content": content}


async def _stream(backend: ModelBackend, prompt, params, tools, head: dict, logprobs: bool, usage: bool = False):
    """SSE chunks as the engine produces text; with tools, the parsed message comes at the end
    (a tool call is only known once complete). A client that goes away cancels its requests."""
    import asyncio

    queue: asyncio.Queue = asyncio.Queue()

    def chunk(i: int, delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
        choice = {"index": i, "delta": delta, "finish_reason": finish} | (extra or {})
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

    async def run(i: int, p: SamplingParams) -> None:
        on_token = None if tools else (lambda delta: queue.put_nowait((i, delta)))
        try:
            c = await backend.generate(prompt, p, on_token)
            queue.put_nowait((i, c))
        except Exception as e:  # noqa: BLE001 - reported in the stream, which has already started
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(run(i, p)) for i, p in enumerate(params)]
    try:
        for i in range(len(params)):
            yield chunk(i, {"role": "assistant", "content": ""})
        remaining, started, generated = len(params), [False] * len(params), 0
        while remaining:
            i, item = await queue.get()
            if isinstance(item, str):
                # Leading whitespace is dropped, as the parsed non-streamed content drops it.
                item = item if started[i] else item.lstrip()
                if item:
                    started[i] = True
                    yield chunk(i, {"content": item})
            elif isinstance(item, Exception):
                remaining -= 1
                yield f"data: {json.dumps({'error': {'message': str(item), 'index': i}})}\n\n"
            else:
                remaining -= 1
                generated += len(item.token_ids)
                message = backend.parse(item.text, tools)
                delta = {}
                if tools:
                    delta = {k: v for k, v in _openai_message(message).items() if k != "role" and v is not None}
                    for j, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = j
                extra = {"logprobs": _logprobs(backend, item)} if logprobs else None
                yield chunk(i, delta, _finish(item, message), extra)
        if usage:
            counts = {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated}
            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': counts})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
