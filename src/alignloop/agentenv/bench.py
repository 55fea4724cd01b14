"""`alignloop env bench`: how fast the agent environment is, here and over HTTP.

Measured, in this order, on medium tasks: sandbox start (bwrap + the agent up + the repository
copied in; `starts` sandboxes one after another), tool-call latency (`calls` calls each of
read_file and `run true`, one at a time, on one episode: locally, then through a server on
127.0.0.1 in this process, so the HTTP figure is the local one plus a real HTTP round trip), and a
batch of tool calls of one turn run in parallel vs one after another (`rounds` alternating rounds
each, after a warm-up; median). Percentiles are nearest-rank over the samples.
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from alignloop.agentenv.client import RemoteEpisodes
from alignloop.agentenv.episodes import Episodes
from alignloop.agentenv.limits import SandboxLimits
from alignloop.agentenv.sandbox import Sandbox
from alignloop.agentenv.tasks import Task, make_task


def batch(task: Task) -> list[tuple[str, dict]]:
    """One turn's worth of typical calls on `task`: tests, lint, reads, a grep, shell commands."""
    source = next(k for k in task.files if not k.startswith("tests/"))
    return [("run_tests", {}), ("lint", {}), ("read_file", {"path": source}), ("grep", {"pattern": "def "}),
            ("run", {"command": "python3 -c 'print(sum(i * i for i in range(200000)))'"}), ("run_tests", {}),
            ("lint", {}), ("run", {"command": "ls -la && wc -l *.py"})]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _ms(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1000 * percentile(samples, 50), 2), "p99_ms": round(1000 * percentile(samples, 99), 2),
            "n": len(samples)}


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn serving the agent environment on 127.0.0.1 in a thread, for as long as the block."""

    def __enter__(self) -> str:
        import uvicorn

        from alignloop.agentenv.server import create_app
        port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_bench(starts: int = 30, calls: int = 100, rounds: int = 5, say: Callable[[str], None] = print) -> dict:
    """Measure and `say` one line per figure; the figures as one dict."""
    limits = SandboxLimits()
    task = make_task("medium", 0)
    out: dict[str, Any] = {"cores": os.cpu_count(), "task": task.id}

    Sandbox(limits).start(task.files).close()  # warm-up: the runtime folder, page cache
    starts_s = []
    for _ in range(starts):
        box = Sandbox(limits).start(task.files)
        starts_s.append(box.start_seconds)
        box.close()
    out["sandbox_start"] = _ms(starts_s)
    say(f"sandbox start: p50 {out['sandbox_start']['p50_ms']} ms, p99 {out['sandbox_start']['p99_ms']} ms "
        f"({starts} sandboxes)")

    def latencies(env: Any, where: str) -> None:
        env.reset([task])
        for name, args in (("read_file", {"path": next(iter(task.files))}), ("run", {"command": "true"})):
            env.call(0, name, args)  # warm-up
            figures = _ms(_timed(lambda n=name, a=args: env.call(0, n, a), calls))
            out[f"tool_{name}_{where}"] = figures
            say(f"tool call {name} ({where}): p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms ({calls} calls)")

    with Episodes(limits=limits) as env:
        latencies(env, "local")
        calls_ = batch(task)
        env.calls(0, calls_)  # warm-up (the test runner's and ruff's first start)
        serial, parallel = [], []
        for _ in range(rounds):
            parallel += _timed(lambda: env.calls(0, calls_, parallel=True), 1)
            serial += _timed(lambda: env.calls(0, calls_, parallel=False), 1)
        out["batch"] = {"calls": len(calls_), "serial_ms": round(1000 * statistics.median(serial), 1),
                        "parallel_ms": round(1000 * statistics.median(parallel), 1),
                        "speedup": round(statistics.median(serial) / statistics.median(parallel), 2),
                        "rounds": rounds}
    b = out["batch"]
    say(f"batch of {b['calls']} tool calls: serial {b['serial_ms']} ms, parallel {b['parallel_ms']} ms "
        f"({b['speedup']}x on {out['cores']} cores, median of {rounds})")
    with _Server() as url, RemoteEpisodes(url, limits=limits) as remote:
        latencies(remote, "http")
    return out
