"""Run the server: load the recipe's model versions, open the store, serve until stopped.

uvicorn is run in-process with a socket we bind first, so `port = 0` (any free port) works and the
real address is printed before the first request can arrive: tests and the simulated users read
it from the line `serving on http://HOST:PORT` (or pass `ready`, called with the URL).

Two ways to run it beside other work: `InThread` (an app on a thread of this process: the
flywheel's deployment, tests) and `start_process` (`alignloop serve` as its own process, its
address read from that line: the serve benchmark, the kill -9 test).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn

from alignloop.errors import AlignloopError
from alignloop.serve.app import create_app
from alignloop.serve.config import ServeRecipe
from alignloop.ui import console

# Keep-alive well past uvicorn's 5 s default: a client reusing a pooled connection just as the
# server closes it sees a reset, and clients of a chat product pause longer than 5 s.
KEEP_ALIVE_S = 120


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
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
    versions = ", ".join(f"{m.version} ({m.model}, share {m.share:g})" for m in recipe.models)
    console.print(f"models: {versions}; store: {recipe.serve.store}", highlight=False)
    print(f"serving on {url}", flush=True)
    if ready is not None:
        ready(url)
    server.run(sockets=[sock])


class InThread:
    """`with InThread(app) as s:` the app served on a free loopback port (`s.url`) by a thread of
    this process, stopped (and the app's shutdown run) on leaving the block."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> InThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AlignloopError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


def start_process(recipe: Path, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`alignloop serve RECIPE` as a child process; (the process, its URL) once it is listening."""
    proc = subprocess.Popen([sys.executable, "-m", "alignloop.cli", "--quiet", "serve", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("serving on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AlignloopError(f"the server did not start: {proc.stdout.read()[-2000:]}")
