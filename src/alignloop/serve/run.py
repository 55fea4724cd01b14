"""Run the server: load the recipe's model versions, open the store, serve until stopped.

uvicorn is run in-process with a socket we bind first, so `port = 0` (any free port) works and the
real address is printed before the first request can arrive: tests and the simulated users read
it from the line `serving on http://HOST:PORT` (or pass `ready`, called with the URL).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn

from alignloop.serve.app import create_app
from alignloop.serve.config import ServeRecipe
from alignloop.ui import console


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(256)
    return sock


def serve(recipe: ServeRecipe, ready: Callable[[str], None] | None = None, app=None) -> None:
    """Serve until interrupted; the app's shutdown stops the engine loops and closes the store."""
    app = app or create_app(recipe)
    sock = bind(recipe.serve.host, recipe.serve.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    # Keep-alive well past uvicorn's 5 s default: a client reusing a pooled connection just as the
    # server closes it sees a reset, and clients of a chat product pause longer than 5 s.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=120)
    server = uvicorn.Server(config)
    versions = ", ".join(f"{m.version} ({m.model}, share {m.share:g})" for m in recipe.models)
    console.print(f"models: {versions}; store: {recipe.serve.store}", highlight=False)
    print(f"serving on {url}", flush=True)
    if ready is not None:
        ready(url)
    server.run(sockets=[sock])
