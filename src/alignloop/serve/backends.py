"""The deployed model versions, and which one each user talks to.

A `ModelBackend` is one version: an engine loop (`alignloop.engine.online.OnlineEngine`) and its
tokenizer's chat template (rendered by the chat layer, tools included; replies parsed back into
OpenAI messages with tool calls by the chat layer's parser). `generate` is awaitable: the engine
thread hands tokens to the caller's asyncio loop, so the server's event loop never blocks on
the model.

A/B serving: `assign(user_id)` maps a user to a version by a stable hash of the id, weighted by
the versions' shares, so a user stays on one version across requests, restarts and machines,
and the version is recorded on every conversation (and so on every event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alignloop.chat.families import detect_family_of_tokenizer, get_family
from alignloop.chat.parse import parse_assistant
from alignloop.chat.render import render
from alignloop.data.stablehash import hash_strings, unit_interval
from alignloop.engine.api import Completion, SamplingParams
from alignloop.engine.engine import Engine
from alignloop.engine.online import OnlineEngine
from alignloop.serve.config import ModelVersionSection, ServeSection


@dataclass
class Generated:
    completion: Completion
    message: dict     # the parsed assistant message: content, tool_calls where the model called tools


class ModelBackend:
    def __init__(self, version: str, engine: Engine, context: int = 2048, threads: int | None = None,
                 family: str | None = None):
        self.version = version
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.online = OnlineEngine(engine, context=context, threads=threads).start()
        # The chat family decides how tool calls are written and parsed; detected from the template
        # unless the recipe names it (a fine-tuned model's template may not be recognisable).
        self.family = get_family(family) if family else detect_family_of_tokenizer(self.tokenizer)

    @classmethod
    def from_section(cls, section: ModelVersionSection, serve: ServeSection) -> ModelBackend:
        engine = Engine.from_name(section.model, seed=section.seed, dtype=section.dtype, max_batch=serve.max_batch,
                                  show_progress=False)
        if serve.prefix_cache_mb and hasattr(engine.lm, "slot_kv"):   # Llama-family runners
            engine.use_prefix_cache(serve.prefix_cache_mb << 20)
        return cls(section.version, engine, serve.context, serve.threads or None, section.chat_family)

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        tok = self.tokenizer
        text = render(tok.chat_template, messages, tools=tools, add_generation_prompt=True,
                      bos_token=tok.bos_token, eos_token=tok.eos_token)
        return tok(text, add_special_tokens=False)["input_ids"]

    def parse(self, text: str, tools: list[dict] | None) -> dict:
        if self.family is None:
            return {"role": "assistant", "content": text.strip()}
        return parse_assistant(text, self.family, tools=tools)

    async def generate(self, prompt: list[int], params: SamplingParams, on_token=None) -> Completion:
        """One completion; `on_token(delta)` is called on the caller's event loop as text arrives.
        Cancelling the awaiting task cancels the request in the engine (its slot is freed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()

        def done(completion: Completion | None, error: str | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if error is not None:
                    future.set_exception(RuntimeError(error))
                else:
                    future.set_result(completion)
            loop.call_soon_threadsafe(settle)

        token = None if on_token is None else (lambda delta: loop.call_soon_threadsafe(on_token, delta))
        request = self.online.submit(prompt, params, done, token)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            request.cancel()
            raise

    def close(self) -> None:
        self.online.stop()


def assign(user_id: str, versions: Sequence[str], shares: Sequence[float]) -> str:
    """The version `user_id` is served: a stable hash of the id, mapped onto the shares' intervals."""
    if len(versions) == 1:
        return versions[0]
    u = float(unit_interval(hash_strings([user_id], salt="ab-assignment"))[0])
    edges = np.cumsum(np.asarray(shares, dtype=np.float64) / float(np.sum(shares)))
    return versions[min(int(np.searchsorted(edges, u, side="right")), len(versions) - 1)]
