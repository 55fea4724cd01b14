"""The engine for requests that arrive while others run: one loop, requests join and leave the batch.

`Engine.generate` takes a whole list of prompts and returns when all are done: right for RL and
evaluation, wrong for a server, where request 7 arrives while 1-6 are half-way through. Here one
thread owns the engine and runs its scheduling step forever:

1. take every request submitted since the last step (a thread-safe inbox);
2. decode one token for every live row, call each row's `on_token` with the text it added;
3. retire finished and cancelled rows (their slots are reused at once), call `on_done`;
4. prefill waiting prompts into free slots (same token budget as `Engine`).

So a new request waits at most one decode step (plus its prefill) before it is in the batch, never
for the running batch to drain. The KV cache is allocated once at `slots x context` and never
grows: a server must not stop the world to reallocate (SmolLM2 at 8 slots x 2048: 377 MB fp32).

Callbacks run on the engine thread and must not block: the server's hand them to its event loop.
`submit` may be called from any thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from alignloop.engine.api import Completion, SamplingParams
from alignloop.engine.engine import Engine, _Live

TokenCallback = Callable[[str], None]
DoneCallback = Callable[[Completion | None, str | None], None]  # (completion, error)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_token: TokenCallback | None
    on_done: DoneCallback
    id: int = 0
    cancelled: bool = False
    emitted: str = ""            # the text handed to on_token so far
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); its slot is freed next step."""
        self.cancelled = True


class OnlineEngine:
    """Continuous batching over an `Engine` for concurrent callers; `start()` runs the loop thread."""

    def __init__(self, engine: Engine, context: int = 2048, threads: int | None = None):
        self.engine = engine
        self.context = min(context, engine.lm.max_len)
        self.threads = threads
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0
        self.generated = 0
        self.busy_s = 0.0

    # ---- callers --------------------------------------------------------------------------
    def problem(self, prompt: list[int]) -> str | None:
        """Why this prompt cannot be served (empty, or no room for one answer token); None if fine."""
        if not prompt:
            return "the prompt is empty"
        if len(prompt) >= self.context:
            return f"the prompt has {len(prompt)} tokens; this server's context is {self.context}"
        return None

    def submit(self, prompt: list[int], params: SamplingParams, on_done: DoneCallback,
               on_token: TokenCallback | None = None) -> Request:
        """Queue one request. `max_tokens` is capped to what fits in the context after the prompt."""
        if (why := self.problem(prompt)) is not None:
            raise ValueError(why)
        room = self.context - len(prompt)
        if params.max_tokens > room:
            params = replace(params, max_tokens=room)
        request = Request(list(prompt), params, on_token, on_done, id=next(self._ids))
        self._inbox.put(request)
        return request

    def start(self) -> OnlineEngine:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="alignloop-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        eng = self.engine
        eng.lm.ensure_cache(eng.max_batch, self.context)
        requests: dict[int, Request] = {}
        prompts: dict[int, list[int]] = {}
        params: dict[int, SamplingParams] = {}
        results: dict[int, Completion] = {}
        waiting: deque[int] = deque()
        live: list[_Live] = []
        while not self._stop.is_set():
            idle = not live and not waiting
            try:
                # Block only when there is nothing to do; otherwise just drain what has arrived.
                first = self._inbox.get(timeout=0.05) if idle else self._inbox.get_nowait()
            except queue.Empty:
                first = None
            arrived = [first] if first is not None else []
            while True:
                try:
                    arrived.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for r in arrived:
                requests[r.id], prompts[r.id], params[r.id] = r, r.prompt, r.params
                waiting.append(r.id)
            if not live and not waiting:
                continue
            started = time.perf_counter()
            try:
                self._step(live, waiting, requests, prompts, params, results)
            except Exception as e:  # noqa: BLE001 - a failed step must answer its callers, not hang them
                for s in live:
                    self._finish(requests.pop(s.index), None, f"generation failed: {e}")
                for i in waiting:
                    self._finish(requests.pop(i), None, f"generation failed: {e}")
                live.clear()
                waiting.clear()
            self.busy_s += time.perf_counter() - started
            for i in list(results):
                completion = results.pop(i)
                request = requests.pop(i)
                prompts.pop(i), params.pop(i)
                self._emit(request, completion.text)
                self._finish(request, completion, None)

    def _step(self, live, waiting, requests, prompts, params, results) -> None:
        eng = self.engine
        # Cancelled waiting requests never start; cancelled live rows end like finished ones.
        for i in [i for i in waiting if requests[i].cancelled]:
            waiting.remove(i)
            self._finish(requests.pop(i), None, "cancelled")
            prompts.pop(i), params.pop(i)
        for s in live:
            if requests[s.index].cancelled:
                s.done = True
        if live:
            self.steps += 1
            eng._decode_step(live)
            self.generated += len(live)
            self._stream(live, requests)
        eng._retire(live, results)
        if waiting and len(live) < eng.max_batch:
            fresh = eng._admit(waiting, prompts, params, len(live))
            live.extend(fresh)
            self.generated += len(fresh)
            self._stream(fresh, requests)
            eng._retire(live, results)

    def _stream(self, rows: list[_Live], requests: dict[int, Request]) -> None:
        """Hand each streaming row the text its new token completed.

        Text is decoded from all of a row's tokens (a token may finish a multi-byte character a
        previous one began); a tail that could still become a stop string, or a half character, is
        held back until it is settled, so a client never sees text the final answer drops.
        """
        tok = self.engine.tokenizer
        for s in rows:
            r = requests[s.index]
            if r.on_token is None or s.done:
                continue
            text = tok.decode(s.out.token_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            if r.params.stop:
                text = text[: max(len(r.emitted), len(text) - max(len(x) for x in r.params.stop) + 1)]
            self._emit(r, text)

    @staticmethod
    def _emit(r: Request, text: str) -> None:
        if r.on_token is not None and len(text) > len(r.emitted) and text.startswith(r.emitted):
            delta, r.emitted = text[len(r.emitted):], text
            r.on_token(delta)

    @staticmethod
    def _finish(r: Request, completion: Completion | None, error: str | None) -> None:
        if r.cancelled and error is None:
            error = "cancelled"
        try:
            r.on_done(completion, error)
        except Exception:  # noqa: BLE001 - a caller's broken callback must not stop the engine
            pass
