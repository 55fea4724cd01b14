"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions`.

`n` choices (swipes; choice i seeded from (seed, i), so a seeded request is reproducible and its
swipes differ), `stream` (SSE; leading whitespace dropped as the parsed answer drops it; with
`stream_options.include_usage` a last chunk with the token counts), `stop`, `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `logprobs`, `tools` (rendered by the chat layer,
the reply parsed back into typed `tool_calls`; 400 for a model whose template has no tool format).
`model` names a served version; without it the caller's A/B version answers. Unknown OpenAI
options are accepted and ignored, as OpenAI clients send many.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from alignloop.engine.api import SamplingParams
from alignloop.serve.backends import ModelBackend
from alignloop.serve.server import Server


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send name, tool_call_id, ...
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    logprobs: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts
    user: str | None = None



def router(server: Server) -> APIRouter:
    routes = APIRouter()
    limits = server.recipe.limits
    authed = Depends(server.user_of)  # the caller's user id, or 401/429

    @routes.get("/v1/models")
    async def models(user: str = authed):
        return {"object": "list", "data": [{"id": v, "object": "model", "owned_by": "alignloop", "created": 0}
                                           for v in server.versions]}

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, user: str = authed):
        if body.n > limits.max_n:
            raise HTTPException(422, f"n = {body.n}: at most {limits.max_n} choices per request")
        version = body.model if body.model not in (None, "", "default") else server.version_for(user)
        if version not in server.backends:
            raise HTTPException(404, f"model '{version}' is not served here (GET /v1/models)")
        backend = server.backends[version]
        tools = body.tools if body.tool_choice != "none" else None
        if tools and (backend.family is None or backend.family.tool_calls is None):
            raise HTTPException(400, f"model '{version}' has no tool-call format in its chat template "
                                     f"({backend.family.name if backend.family else 'unknown family'}): "
                                     "it cannot be offered tools")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        try:
            prompt = backend.encode(messages, tools)
        except Exception as e:  # noqa: BLE001 - the template refused these messages: the caller's input
            raise HTTPException(422, f"the chat template cannot render these messages: {e}") from None
        if (why := backend.online.problem(prompt)) is not None:
            raise HTTPException(400, why)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        base = server.params(body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p,
                             body.seed, stop)
        # Choice i is seeded (seed, i): a request with a seed is reproducible, and its swipes differ.
        seed = body.seed if body.seed is not None else secrets.randbits(31)
        params = [replace(base, seed=(seed * 1009 + i) % (2**31 - 1)) for i in range(body.n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": created, "model": version}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(backend, prompt, params, tools, head, body.logprobs, usage),
                                     media_type="text/event-stream")
        completions = await asyncio.gather(*(backend.generate(prompt, p) for p in params))
        choices = []
        for i, c in enumerate(completions):
            message = backend.parse(c.text, tools)
            choice = {"index": i, "message": _openai_message(message), "finish_reason": _finish(c, message)}
            choice["logprobs"] = _logprobs(backend, c) if body.logprobs else None
            choices.append(choice)
        used = sum(len(c.token_ids) for c in completions)
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": used,
                          "total_tokens": len(prompt) + used,
                          "prompt_tokens_details": {"cached_tokens": max(c.cached_tokens for c in completions)}}}

    return routes


def _openai_message(message: dict) -> dict:
    out: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [{"id": c.get("id") or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": json.dumps(c["function"]["arguments"])}}
                             for c in calls]
    return out


def _finish(completion, message: dict) -> str:
    if message.get("tool_calls"):
        return "tool_calls"
    return completion.finish_reason


def _logprobs(backend: ModelBackend, completion) -> dict:
    tok = backend.tokenizer
    content = []
    for t, lp in zip(completion.token_ids, completion.logprobs):
        piece = tok.decode([t])
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []})
    return {"content": content}


async def _stream(backend: ModelBackend, prompt, params, tools, head: dict, logprobs: bool, usage: bool = False):
    """SSE chunks as the engine produces text; with tools, the parsed message comes at the end
    (a tool call is only known once complete). A client that goes away cancels its requests."""
    queue: asyncio.Queue = asyncio.Queue()

    def chunk(i: int, delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
        choice = {"index": i, "delta": delta, "finish_reason": finish} | (extra or {})
        return f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

    async def run(i: int, p: SamplingParams) -> None:
        on_token = None if tools else (lambda delta: queue.put_nowait((i, delta)))
        try:
            c = await backend.generate(prompt, p, on_token)
            queue.put_nowait((i, c))
        except Exception as e:  # noqa: BLE001 - reported in the stream, which has already started
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(run(i, p)) for i, p in enumerate(params)]
    try:
        for i in range(len(params)):
            yield chunk(i, {"role": "assistant", "content": ""})
        remaining, started, generated, cached = len(params), [False] * len(params), 0, 0
        while remaining:
            i, item = await queue.get()
            if isinstance(item, str):
                # Leading whitespace is dropped, as the parsed non-streamed content drops it.
                item = item if started[i] else item.lstrip()
                if item:
                    started[i] = True
                    yield chunk(i, {"content": item})
            elif isinstance(item, Exception):
                remaining -= 1
                yield f"data: {json.dumps({'error': {'message': str(item), 'index': i}})}\n\n"
            else:
                remaining -= 1
                generated += len(item.token_ids)
                cached = max(cached, item.cached_tokens)
                message = backend.parse(item.text, tools)
                delta = {}
                if tools:
                    delta = {k: v for k, v in _openai_message(message).items() if k != "role" and v is not None}
                    for j, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = j
                extra = {"logprobs": _logprobs(backend, item)} if logprobs else None
                yield chunk(i, delta, _finish(item, message), extra)
        if usage:
            counts = {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated, "prompt_tokens_details": {"cached_tokens": cached}}
            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': counts})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()

