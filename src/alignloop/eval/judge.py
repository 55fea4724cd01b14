"""Rubric evaluation by an LLM judge through the engine: one prompt per dimension, a 1-5 score each.

The dimensions are the ones used to grade creative, character-driven dialogue. Each prompt shows
the conversation so far and the response, states what the dimension means and what a 1 and a 5
look like, and asks for a single line `Score: N`. The judge samples greedily, so a rerun gives the
same scores. Parsing takes the first `Score: N` (else the first lone digit 1-5) and counts answers
it cannot read instead of guessing: a weak judge shows up as a high unparsed rate, not as noise
dressed up as a number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from alignloop.engine.api import SamplingParams

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
