"""`alignloop env serve`: agent environments over HTTP (FastAPI), so they run on other machines.

One session is one `Episodes` batch (the RL interface: reset, step, close, snapshot, restore);
a server holds up to `max_sessions` of them at once. Bodies are the JSON forms of tasks, messages,
`EpisodeStep` and `Snapshot`. A user-side mistake (unknown session, bad episode, a task the server
cannot start) answers 400 with {"detail": message}; the client raises it as `AgentEnvError`.

    POST   /sessions                    {family, max_turns, max_calls, penalty, limits} -> {session}
    POST   /sessions/{id}/reset         {tasks: [Task]}          -> {observations, start_seconds}
    POST   /sessions/{id}/step          {actions: [str|null]}    -> EpisodeStep
    POST   /sessions/{id}/calls         {episode, calls: [[name, arguments]], parallel} -> {contents}
    POST   /sessions/{id}/snapshot      {episode}                -> Snapshot
    POST   /sessions/{id}/restore       {episode, snapshot}      -> {}
    DELETE /sessions/{id}                                        -> {}
    GET    /health                                               -> {ok, sandbox_problem, sessions}
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from alignloop.agentenv.episodes import Episodes
from alignloop.agentenv.limits import AgentEnvError, SandboxLimits
from alignloop.agentenv.sandbox import Snapshot, bwrap_problem
from alignloop.agentenv.tasks import Task


class SessionSpec(BaseModel):
    family: str = "qwen2.5"
    max_turns: int = Field(4, ge=1)
    max_calls: int = Field(4, ge=1)
    penalty: float = Field(0.1, ge=0)
    tools: list[str] | None = None
    code_blocks: bool = False
    limits: SandboxLimits = SandboxLimits()


class ResetBody(BaseModel):
    tasks: list[dict]


class StepBody(BaseModel):
    actions: list[str | None]


class CallsBody(BaseModel):
    episode: int
    calls: list[tuple[str, dict]]
    parallel: bool = True


class EpisodeBody(BaseModel):
    episode: int


class RestoreBody(BaseModel):
    episode: int
    snapshot: dict


class _Session:
    def __init__(self, episodes: Episodes) -> None:
        self.episodes = episodes
        self.lock = threading.Lock()   # one request at a time per session (a batch is one RL step)


def create_app(max_sessions: int = 16) -> FastAPI:
    sessions: dict[str, _Session] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for s in list(sessions.values()):  # the server stops: no sandbox outlives it
            s.episodes.close()

    app = FastAPI(title="alignloop agent environment", lifespan=lifespan)
    ids = itertools.count(1)
    guard = threading.Lock()

    def session(sid: str) -> _Session:
        with guard:
            if sid not in sessions:
                raise HTTPException(400, f"no session {sid!r}")
            return sessions[sid]

    def run(sid: str, fn: Any) -> Any:
        s = session(sid)
        with s.lock:
            try:
                return fn(s.episodes)
            except AgentEnvError as e:
                raise HTTPException(400, str(e)) from None

    @app.get("/health")
    def health() -> dict:
        return {"ok": True, "sandbox_problem": bwrap_problem(), "sessions": len(sessions)}

    @app.post("/sessions")
    def open_session(spec: SessionSpec) -> dict:
        with guard:
            if len(sessions) >= max_sessions:
                raise HTTPException(400, f"server is full: {max_sessions} sessions open")
            sid = str(next(ids))
            try:
                sessions[sid] = _Session(Episodes(spec.family, spec.limits, spec.max_turns, spec.max_calls,
                                                  spec.penalty, tools=spec.tools,
                                                  code_blocks=spec.code_blocks))
            except AgentEnvError as e:
                raise HTTPException(400, str(e)) from None
        return {"session": sid}

    @app.post("/sessions/{sid}/reset")
    def reset(sid: str, body: ResetBody) -> dict:
        def go(env: Episodes) -> dict:
            observations = env.reset([Task.from_json(t) for t in body.tasks])
            return {"observations": observations, "start_seconds": env.start_seconds}
        return run(sid, go)

    @app.post("/sessions/{sid}/step")
    def step(sid: str, body: StepBody) -> dict:
        return run(sid, lambda env: env.step(body.actions).to_json())

    @app.post("/sessions/{sid}/calls")
    def calls(sid: str, body: CallsBody) -> dict:
        return run(sid, lambda env: {"contents": env.calls(body.episode, [tuple(c) for c in body.calls],
                                                           body.parallel)})

    @app.post("/sessions/{sid}/snapshot")
    def snapshot(sid: str, body: EpisodeBody) -> dict:
        return run(sid, lambda env: env.snapshot(body.episode).to_json())

    @app.post("/sessions/{sid}/restore")
    def restore(sid: str, body: RestoreBody) -> dict:
        return run(sid, lambda env: env.restore(body.episode, Snapshot.from_json(body.snapshot)) or {})

    @app.delete("/sessions/{sid}")
    def close(sid: str) -> dict:
        with guard:
            s = sessions.pop(sid, None)
        if s is not None:
            with s.lock:
                s.episodes.close()
        return {}

    return app


def serve(host: str = "127.0.0.1", port: int = 8765, max_sessions: int = 16) -> None:
    import uvicorn
    uvicorn.run(create_app(max_sessions), host=host, port=port, log_level="warning")
