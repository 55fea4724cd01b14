"""`alignloop bench serve`: the server under load, vs the same requests without it.

Work: chat completions of the 64 fixed bench prompts (as user messages), `max_tokens` each,
sampled at temperature 0.8 with a seed per request, so every side generates the same kind and
number of tokens per request.

Configurations, in alternating rounds (`alignloop.bench.harness`):
- `server`: `alignloop serve` as its own process on loopback; `clients` concurrent clients (asyncio,
  in this process) for `seconds` each round, each streaming one completion after another
  (`stream: true`, usage in the last chunk) and, after each, posting a read and a vote event for
  its conversation to the product API and remembering every event id the server acknowledged;
- `engine`: the same requests sent straight to the engine in this process (`Engine.generate`, the
  same model, dtype, batch size and threads): what the server costs is the ratio of the two;
- `serial`: one client, one request at a time, through the server: what concurrency buys.

Measured: tokens/s (median, min, max over rounds); time to first token and end-to-end latency
p50/p99 of the server's requests (every round); lost events: acknowledged ids missing from the
store after the run (must be 0). Threads: the server's engine and the in-process engine both use
`--threads`; the clients are one asyncio thread in this process, which shares the cores with the
server as any client on the same machine would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from alignloop.bench.harness import alternate_rounds, fixed_threads, headline, machine_facts, summary
from alignloop.bench.prompts import bench_prompts
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.serve.run import start_process
from alignloop.serve.store import LogStore
from alignloop.ui import say


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class ServerProcess:
    def __init__(self, model: str, store: Path, max_batch: int, threads: int, dtype: str, max_tokens: int):
        self.key = "bench-key"
        recipe = store.parent / "serve.toml"
        recipe.write_text(
            f'[serve]\nport = 0\nstore = "{store}"\napi_keys = ["{self.key}"]\nmax_batch = {max_batch}\n'
            f'threads = {threads}\ncontext = 1024\n'
            f'[[models]]\nversion = "bench"\nmodel = "{model}"\ndtype = "{dtype}"\n'
            f'[generation]\nmax_tokens = {max_tokens}\n[limits]\nrequests_per_minute = 1000000\n')
        self.proc, self.url = start_process(recipe)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _client(http: httpx.AsyncClient, h: dict, prompts: list[str], first: int, step: int, deadline: float,
                  max_tokens: int, stats: dict, conversation: str, turn: str) -> None:
    i = first
    while time.perf_counter() < deadline:
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        began, ttft, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", "/v1/chat/completions", headers=h, json=body) as r:
            if r.status_code != 200:
                raise AlignloopError(f"bench serve: {r.status_code} {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    ttft = time.perf_counter() - began
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        stats["e2e"].append(time.perf_counter() - began)
        stats["ttft"].append(ttft if ttft is not None else time.perf_counter() - began)
        stats["tokens"] += tokens
        stats["requests"] += 1
        events = [{"type": "read", "conversation_id": conversation, "turn_id": turn, "value": 1.5},
                  {"type": "vote", "conversation_id": conversation, "turn_id": turn, "value": 1}]
        r = await http.post("/api/events", headers=h, json={"events": events})
        if r.status_code == 200:
            stats["acked"].extend(r.json()["event_ids"])
        i += step


async def _load(url: str, clients: int, seconds: float, prompts: list[str], max_tokens: int,
                sessions: list[tuple[dict, str, str]]) -> dict[str, Any]:
    stats: dict[str, Any] = {"e2e": [], "ttft": [], "tokens": 0, "requests": 0, "acked": []}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        began = time.perf_counter()
        deadline = began + seconds
        await asyncio.gather(*(_client(http, sessions[k][0], prompts, k, clients, deadline, max_tokens, stats,
                                       sessions[k][1], sessions[k][2]) for k in range(clients)))
        stats["seconds"] = time.perf_counter() - began
    return stats


def _sessions(url: str, n: int) -> list[tuple[dict, str, str]]:
    """One signed-up user per client, each with a conversation and an answered message to vote on."""
    out = []
    with httpx.Client(base_url=url, timeout=600) as http:
        first = http.get("/api/characters").json()[0]["id"]
        for _ in range(n):
            h = {"Authorization": f"Bearer {http.post('/api/signup').json()['api_key']}"}
            cid = http.post("/api/conversations", headers=h, json={"character_id": first}).json()["conversation_id"]
            turn = http.post(f"/api/conversations/{cid}/messages", headers=h,
                             json={"text": "hello", "parent_id": None}).json()["candidate"]["turn_id"]
            out.append((h, cid, turn))
    return out


def run_bench(model: str = "smollm2-135m", clients: int = 8, seconds: float = 20.0, max_tokens: int = 32,
              rounds: int = 3, threads: int | None = None, dtype: str = "auto") -> dict[str, Any]:
    prompts = bench_prompts()
    with fixed_threads(threads) as n, tempfile.TemporaryDirectory(prefix="alignloop-bench-serve-") as tmp:
        store = Path(tmp) / "logs.db"
        server = ServerProcess(model, store, clients, n, dtype, max_tokens)
        try:
            sessions = _sessions(server.url, clients)
            engine = Engine.from_name(model, dtype=dtype, max_batch=clients, show_progress=False)
            latencies: dict[str, list[float]] = {"ttft": [], "e2e": []}
            acked: list[str] = []
            served: list[int] = []

            def through_server(k: int, window: float) -> dict[str, Any]:
                stats = asyncio.run(_load(server.url, k, window, prompts, max_tokens, sessions))
                acked.extend(stats["acked"])
                if k == clients:
                    latencies["ttft"] += stats["ttft"]
                    latencies["e2e"] += stats["e2e"]
                    served.append(stats["requests"])
                return {"useful": stats["tokens"], "seconds": stats["seconds"], "requests": stats["requests"]}

            def in_process() -> dict[str, Any]:
                # As many requests as the server finished in a round (the same prompts and seeds).
                count = max(served[-1] if served else 2 * clients, clients)
                chats = [[{"role": "user", "content": prompts[i % len(prompts)]}] for i in range(count)]
                params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=i)
                          for i in range(count)]
                began = time.perf_counter()
                done = engine.chat(chats, params)
                return {"useful": sum(len(c.token_ids) for c in done), "seconds": time.perf_counter() - began,
                        "requests": count}

            results = alternate_rounds({"server": lambda: through_server(clients, seconds),
                                        "engine": in_process,
                                        "serial": lambda: through_server(1, seconds)},
                                       rounds=rounds, label="bench serve")
        finally:
            server.stop()
        stored = LogStore(store).event_ids()
    lost = len(set(acked) - stored)
    ours, engine_side, serial = (summary(results[k]) for k in ("server", "engine", "serial"))
    p = {f"{k}_p{q}_ms": round(1000 * percentile(v, q), 1) for k, v in latencies.items() for q in (50, 99)}
    say(f"bench serve: {clients} clients x {seconds:g} s: {ours['median']:.1f} tok/s through the server, "
        f"{engine_side['median']:.1f} in-process (x{ours['median'] / max(engine_side['median'], 1e-9):.2f}), "
        f"{serial['median']:.1f} one request at a time; ttft p50 {p['ttft_p50_ms']} ms p99 {p['ttft_p99_ms']} ms, "
        f"end-to-end p50 {p['e2e_p50_ms']} ms p99 {p['e2e_p99_ms']} ms; events acknowledged {len(acked)}, "
        f"lost {lost}")
    return headline("serve", ours, engine_side, "tok/s (server, N clients vs the engine in-process)",
                    ours_config=f"alignloop serve, {clients} streaming clients on loopback, {max_tokens} tokens, "
                                f"+2 events per request", peer_config=f"Engine.generate in-process, max_batch {clients}",
                    machine=machine_facts(n), serial=serial, clients=clients, seconds_per_round=seconds,
                    latency_ms=p, requests=sum(r["requests"] for r in results["server"]),
                    events_acknowledged=len(acked), events_lost=lost)
