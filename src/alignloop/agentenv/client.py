"""`RemoteEpisodes`: an `Episodes` batch on an `alignloop env serve` server, with the same methods.

The RL loop cannot tell the two apart: reset(tasks) -> first conversations, step(actions) ->
EpisodeStep, close(), snapshot(i) -> Snapshot, restore(i, snapshot), calls(i, [(name, args)]).
The server's 400 answers come back as `AgentEnvError` with its message; an unreachable server is
one too, naming the URL.
"""

from __future__ import annotations

from typing import Any, Self

import httpx

from alignloop.agentenv.episodes import EpisodeStep
from alignloop.agentenv.limits import AgentEnvError, SandboxLimits
from alignloop.agentenv.sandbox import Snapshot
from alignloop.agentenv.tasks import Task


class RemoteEpisodes:
    def __init__(self, url: str, family: str = "qwen2.5", limits: SandboxLimits | None = None, max_turns: int = 4,
                 max_calls: int = 4, penalty: float = 0.1, tools: list[str] | None = None,
                 code_blocks: bool = False, client: httpx.Client | None = None, timeout: float = 300.0) -> None:
        """`client`: an httpx client to use (tests pass FastAPI's TestClient); default: a new one."""
        self.url = url.rstrip("/")
        self._http = client or httpx.Client(timeout=timeout)
        spec = {"family": family, "max_turns": max_turns, "max_calls": max_calls, "penalty": penalty, "tools": tools, "code_blocks": code_blocks,
                "limits": (limits or SandboxLimits()).model_dump()}
        self.session = self._post("/sessions", spec)["session"]
        self.start_seconds: list[float] = []

    def _post(self, path: str, body: dict) -> Any:
        return self._send("POST", path, body)

    def _send(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = self._http.request(method, self.url + path, json=body)
        except httpx.HTTPError as e:
            raise AgentEnvError(f"agent environment server {self.url} unreachable: {e}") from None
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise AgentEnvError(f"agent environment server {self.url}: {detail}")
        return response.json()

    def reset(self, tasks: list[Task]) -> list[list[dict]]:
        out = self._post(f"/sessions/{self.session}/reset", {"tasks": [t.to_json() for t in tasks]})
        self.start_seconds = out["start_seconds"]
        return out["observations"]

    def step(self, actions: list[str | None]) -> EpisodeStep:
        return EpisodeStep.from_json(self._post(f"/sessions/{self.session}/step", {"actions": actions}))

    def calls(self, episode: int, calls: list[tuple[str, dict]], parallel: bool = True) -> list[str]:
        body = {"episode": episode, "calls": [list(c) for c in calls], "parallel": parallel}
        return self._post(f"/sessions/{self.session}/calls", body)["contents"]

    def call(self, episode: int, name: str, arguments: dict) -> str:
        return self.calls(episode, [(name, arguments)])[0]

    def snapshot(self, episode: int) -> Snapshot:
        return Snapshot.from_json(self._post(f"/sessions/{self.session}/snapshot", {"episode": episode}))

    def restore(self, episode: int, snapshot: Snapshot) -> None:
        self._post(f"/sessions/{self.session}/restore", {"episode": episode, "snapshot": snapshot.to_json()})

    def close(self) -> None:
        self._send("DELETE", f"/sessions/{self.session}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
