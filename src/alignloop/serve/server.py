"""What the server's routes share: the recipe, the log store, the model versions, who is calling, limits.

`Server.user_of` is the dependency every authenticated route takes: the caller's user id from
`Authorization: Bearer KEY` (a signed-up user's key, stored hashed, or one of the recipe's static
keys), or 401; then the per-user rate limit, or 429. `BodyLimit` answers 413 for an oversize body
before the app reads it whole.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict, deque

from fastapi import HTTPException, Request

from alignloop.engine.api import SamplingParams
from alignloop.serve.backends import ModelBackend, assign
from alignloop.serve.config import ServeRecipe
from alignloop.serve.store import LogStore


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


