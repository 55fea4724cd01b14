"""Rubric evaluation by an LLM judge through the engine: one prompt per dimension, a 1-5 score each.

The dimensions are the ones used to grade creative, character-driven dialogue. Each prompt shows
the conversation so far and the response, states what the dimension means and what a 1 and a 5
look like, and asks for a single line `Score: N`. The judge samples greedily, so a rerun gives the
same scores. Parsing takes the first `Score: N` (else the first lone digit 1-5) and counts answers
it cannot read instead of guessing: a weak judge shows up as a high unparsed rate, not as noise
dressed up as a number.

The judge is the local engine (any zoo model) or `EndpointJudge`, any OpenAI-compatible
`/v1/chat/completions` server. `judge_report` turns the scores into what a report may print: the
means only when at least `min_parse_rate` of the answers held a score, else "judge unavailable:
parsed k of n". A 135M-parameter model asked for `Score: N` mostly answers something else, and the
mean of the one answer in six it got right is not a rubric score.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from alignloop.engine.api import SamplingParams
from alignloop.errors import AlignloopError

DIMENSIONS: dict[str, tuple[str, str, str]] = {
    # name: (what it measures, what a 1 looks like, what a 5 looks like)
    "novel_contribution": ("adds something new to the conversation: an idea, a detail, a turn of the story",
                           "only restates what the user said", "moves the conversation somewhere fresh"),
    "responsiveness": ("answers what the user actually said or asked",
                       "ignores the user's message", "engages directly with every point the user made"),
    "descriptive_language": ("uses vivid, concrete, sensory language",
                             "flat and generic", "rich imagery that brings the scene to life"),
    "gestures_actions": ("uses role-play actions such as *smiles* where they fit the character",
                         "no actions, or actions that make no sense", "natural actions that fit the character"),
    "overall_quality": ("how good the reply is overall, as the character, for this user",
                        "a reply the user would swipe away at once", "a reply the user would love"),
    "memory_consistency": ("stays consistent with the character and with earlier turns",
                           "contradicts the character or earlier turns", "fully consistent, remembers details"),
    "repetition": ("avoids repeating itself or earlier turns (5 = no repetition)",
                   "mostly repeats earlier text", "nothing repeated"),
}

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])\b", re.IGNORECASE)
_DIGIT = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def judge_prompt(dimension: str, conversation: Sequence[dict], response: str) -> list[dict]:
    """The judge's chat messages for one (conversation, response) on one dimension."""
    what, low, high = DIMENSIONS[dimension]
    lines = [f"{m['role'].upper()}: {m['content']}" for m in conversation if m["role"] != "system"]
    character = next((m["content"] for m in conversation if m["role"] == "system"), "")
    task = (
        f"You grade one reply of a chat character on a single dimension: {dimension.replace('_', ' ')} "
        f"({what}).\n1 = {low}; 5 = {high}.\n"
        + (f"\nCharacter: {character}\n" if character else "")
        + "\nConversation:\n" + "\n".join(lines)
        + f"\n\nReply to grade:\n{response}\n\nAnswer with one line: Score: N (N from 1 to 5)."
    )
    return [{"role": "user", "content": task}]


def parse_score(text: str) -> int | None:
    """The judge's 1-5 score, or None when the answer holds none."""
    match = _SCORE.search(text) or _DIGIT.search(text)
    return int(match.group(1)) if match else None


@dataclass
class RubricResult:
    scores: dict[str, list[int | None]] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, values in self.scores.items():
            read = [v for v in values if v is not None]
            out[name] = {"mean": sum(read) / len(read) if read else float("nan"),
                         "unparsed_rate": 1 - len(read) / len(values) if values else float("nan"),
                         "n": len(values)}
        return out

    def parsed(self) -> tuple[int, int]:
        """(answers holding a score, answers) over every dimension."""
        values = [v for vs in self.scores.values() for v in vs]
        return sum(v is not None for v in values), len(values)


def rubric_eval(engine, conversations: Sequence[Sequence[dict]], responses: Sequence[str],
                dimensions: Sequence[str] = tuple(DIMENSIONS), max_tokens: int = 16) -> RubricResult:
    """Score every response on every dimension with `engine` (anything with `chat(messages, params)`)."""
    if len(conversations) != len(responses):
        raise ValueError(f"{len(conversations)} conversations but {len(responses)} responses")
    unknown = set(dimensions) - set(DIMENSIONS)
    if unknown:
        raise ValueError(f"unknown rubric dimension(s) {sorted(unknown)}; known: {', '.join(DIMENSIONS)}")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prompts = [judge_prompt(d, c, r) for d in dimensions for c, r in zip(conversations, responses)]
    answers = engine.chat(prompts, params) if prompts else []
    result = RubricResult()
    n = len(responses)
    for k, name in enumerate(dimensions):
        result.scores[name] = [parse_score(a.text) for a in answers[k * n : (k + 1) * n]]
    return result


def judge_report(result: RubricResult, judge: str, min_parse_rate: float) -> dict[str, Any]:
    """What a report may say about a rubric run by `judge` (a name for people).

    `available`: at least `min_parse_rate` of all answers held a score; only then are the per-
    dimension means in `scores`. `message` is one line either way.
    """
    k, n = result.parsed()
    rate = k / n if n else float("nan")
    available = n > 0 and rate >= min_parse_rate
    if available:
        message = f"judge {judge}: parsed {k} of {n} ({rate:.0%})"
    else:
        message = (f"judge unavailable: parsed {k} of {n} (judge {judge}; needs {min_parse_rate:.0%}; "
                   "a capable model behind judge_endpoint can grade)")
    return {"available": available, "judge": judge, "parsed": k, "n": n,
            "parse_rate": None if math.isnan(rate) else rate, "min_parse_rate": min_parse_rate,
            "scores": result.summary() if available else None, "message": message}


@dataclass
class JudgeAnswer:
    text: str
    finish_reason: str | None = None


def chat_completions_url(base_url: str) -> str:
    """`base_url` as OpenAI clients take it ("http://host:8000/v1"), or the bare server ("http://host:8000")."""
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class EndpointJudge:
    """A judge behind an OpenAI-compatible chat-completions server (vLLM, llama.cpp, a hosted API).

    `chat(prompts, params)` answers like the engine's, so `rubric_eval` takes either. The API key,
    if any, is read from the environment variable `api_key_env` names: recipes and manifests hold
    the variable's name, never the key. Server errors (5xx, 429) and timeouts are retried
    `retries` times; anything else, or a server that never answers, is an error that names the URL.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout_s: float = 60.0,
                 concurrency: int = 4, retries: int = 2):
        if not base_url.startswith(("http://", "https://")):
            raise AlignloopError(f"judge endpoint base_url must start with http:// or https://, got {base_url!r}")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.timeout_s = timeout_s
        self.concurrency = max(1, concurrency)
        self.retries = retries
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise AlignloopError(f"judge endpoint: environment variable {api_key_env} (judge api_key_env) is not set")
            self.headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"EndpointJudge({self.model} at {self.url})"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                if (e.code >= 500 or e.code == 429) and attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                detail = e.read().decode("utf-8", "replace")[:200]
                raise AlignloopError(f"judge endpoint {self.url}: HTTP {e.code} {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                raise AlignloopError(f"judge endpoint {self.url} did not answer: {getattr(e, 'reason', e)}") from None
            except json.JSONDecodeError:
                raise AlignloopError(f"judge endpoint {self.url} answered with something that is not JSON") from None
        raise AssertionError("unreachable")

    def _one(self, messages: list[dict], params: SamplingParams) -> JudgeAnswer:
        body = {"model": self.model, "messages": messages, "temperature": params.temperature,
                "max_tokens": params.max_tokens}
        reply = self._post(body)
        try:
            choice = reply["choices"][0]
            # A message with no content (a refusal, a tool call) holds no score: it counts as unparsed.
            return JudgeAnswer(choice["message"].get("content") or "", choice.get("finish_reason"))
        except (KeyError, IndexError, TypeError, AttributeError):
            raise AlignloopError(f"judge endpoint {self.url}: no choices[0].message in the answer "
                                 f"{json.dumps(reply)[:200]}") from None

    def chat(self, prompts: Sequence[list[dict]], params: SamplingParams) -> list[JudgeAnswer]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self._one(m, params), prompts))
