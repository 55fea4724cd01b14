"""The server: the OpenAI-compatible API, the product API the chat UI talks to, and the UI itself.

    GET  /                          the chat UI (static files, no build step)
    GET  /v1/models, POST /v1/chat/completions      `alignloop.serve.openai_api`
    /api/...                                        `alignloop.serve.product_api`

Every /v1 and /api call but signup and characters needs `Authorization: Bearer <key>`: a key from
signup, or one of the recipe's static keys (401 otherwise); bodies over `limits.max_body_bytes`
get 413 before they are read whole; more than `requests_per_minute` gets 429
(`alignloop.serve.server`).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from alignloop.serve import openai_api, product_api
from alignloop.serve.backends import ModelBackend
from alignloop.serve.config import ServeRecipe
from alignloop.serve.server import BodyLimit, Server
from alignloop.serve.store import LogStore

STATIC = Path(__file__).parent / "static"


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

    app.include_router(openai_api.router(server))
    app.include_router(product_api.router(server))
    return app
