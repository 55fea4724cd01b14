"""A verifiable task (R1-style): generated arithmetic and word problems with exact answers.

The reward is the sum of an exact-answer reward and a smaller format reward (the reply ends with
"Answer: <integer>"), as DeepSeek-R1's rule-based rewards. Which number is "the answer" is a choice:
`tag` takes the number after the last "Answer:" (R1's rule: a model that never writes the tag never
earns the answer reward), `last_number` the last integer of the reply (the usual lenient grading of
GSM8K-style evals; a 135M model rarely follows the tag at first, so only this gives it a signal to
learn from). `length_penalty` takes a little off per character (length control: the answer is
one number, not an essay), a reward that even a model that never answers right varies on.
Problems are drawn from a seed, so a run and its held-out eval set are fixed.

`accuracy_change` compares greedy accuracy on the same held-out problems before and after training:
paired, with McNemar's exact test on the problems that changed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import stats

from alignloop.rl.env import EnvSectionBase, Step

INSTRUCTION = "Solve the problem. End your reply with 'Answer: ' followed by the number only."
_ANSWER = re.compile(r"Answer:\s*\**\s*(-?\d[\d,]*)\s*\**\s*\.?\s*$")
_ANY_ANSWER = re.compile(r"Answer:\s*\**\s*(-?\d[\d,]*)")
_NUMBER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?")
AnswerFrom = Literal["tag", "last_number"]

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
_THINGS = ("apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def make_problem(rng: random.Random, max_operand: int = 50) -> Problem:
    kind = rng.choice(("add", "sub", "mul", "word_add", "word_sub"))
    a, b = rng.randint(2, max_operand), rng.randint(2, max_operand)
    if kind == "add":
        return Problem(f"What is {a} + {b}?", a + b)
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return Problem(f"What is {a} - {b}?", a - b)
    if kind == "mul":
        b = rng.randint(2, 9)
        return Problem(f"What is {a} * {b}?", a * b)
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    if kind == "word_add":
        return Problem(f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b)
    a, b = max(a, b), min(a, b)
    return Problem(f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b)


def parse_answer(text: str, strict: bool = True) -> int | None:
    """The integer after "Answer:": at the very end of the reply (strict), or the last one anywhere."""
    text = text.strip()
    if strict:
        m = _ANSWER.search(text)
        return int(m.group(1).replace(",", "")) if m else None
    found = _ANY_ANSWER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def last_number(text: str) -> int | float | None:
    """The last number of the reply (thousands commas dropped; a decimal stays a float, never equal
    to an integer answer unless it is one)."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return float(value) if "." in value else int(value)


def score(text: str, answer: int, correct_reward: float = 1.0, format_reward: float = 0.1,
          answer_from: AnswerFrom = "tag") -> tuple[float, bool, bool]:
    """(reward, correct, well_formatted) for one reply."""
    strict = parse_answer(text, strict=True)
    formatted = strict is not None
    if formatted:
        got = strict
    else:
        got = last_number(text) if answer_from == "last_number" else parse_answer(text, strict=False)
    correct = got == answer
    return correct_reward * correct + format_reward * formatted, correct, formatted


class ArithmeticEnv:
    """Single-turn: the first observation is the problem; the reply ends the episode."""

    name = "arithmetic"

    def __init__(self, max_operand: int = 50, correct_reward: float = 1.0, format_reward: float = 0.1,
                 system: str | None = None, answer_from: AnswerFrom = "tag", length_penalty: float = 0.0) -> None:
        self.max_operand = max_operand
        self.length_penalty = length_penalty
        self.answer_from = answer_from
        self.correct_reward = correct_reward
        self.format_reward = format_reward
        self.system = system
        self._episodes: list[Problem] = []

    def sample_tasks(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(f"arithmetic:{seed}")
        return [make_problem(rng, self.max_operand) for _ in range(n)]

    def messages(self, problem: Problem) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]

    def reset(self, tasks: list[Problem]) -> list[list[dict]]:
        self._episodes = list(tasks)
        return [self.messages(p) for p in tasks]

    def step(self, actions: list[str | None]) -> Step:
        if len(actions) != len(self._episodes):
            raise ValueError(f"{len(actions)} actions for {len(self._episodes)} episodes")
        rewards, info = np.zeros(len(actions)), []
        for i, (text, problem) in enumerate(zip(actions, self._episodes)):
            r, correct, formatted = score(text or "", problem.answer, self.correct_reward, self.format_reward,
                                          self.answer_from)
            rewards[i] = r - self.length_penalty * len(text or "") / 100
            info.append({"correct": float(correct), "formatted": float(formatted)})
        return Step([None] * len(actions), rewards, np.ones(len(actions), dtype=bool), info)


class ArithmeticEnvSection(EnvSectionBase):
    """`[env] kind = "arithmetic"`: verifiable problems, graded exactly."""

    kind: Literal["arithmetic"] = "arithmetic"
    max_operand: int = Field(50, ge=2, description="operands are drawn from 2..max_operand")
    correct_reward: float = 1.0
    format_reward: float = Field(0.1, description="for ending with 'Answer: <integer>'")
    answer_from: AnswerFrom = Field(
        "tag", description="the graded number: after the last 'Answer:' (tag), or the reply's last number")
    length_penalty: float = Field(0.0, ge=0, description="subtracted per 100 characters of the reply")
    system: str | None = Field(None, description="system prompt (none: the template's default)")
    eval_tasks: int = Field(64, ge=0, description="held-out tasks scored greedily at eval")

    def build(self, prompts: list[list[dict]] | None = None) -> ArithmeticEnv:
        return ArithmeticEnv(self.max_operand, self.correct_reward, self.format_reward, self.system, self.answer_from,
                             self.length_penalty)


@dataclass(frozen=True)
class AccuracyChange:
    before: float
    after: float
    diff: float
    lo: float          # 95% interval of the paired difference (normal approximation)
    hi: float
    gained: int        # problems wrong before and right after
    lost: int
    p_value: float     # McNemar's exact test: gained vs lost as a fair coin
    n: int

    def line(self) -> str:
        return (f"greedy accuracy {self.before:.3f} -> {self.after:.3f} on {self.n} held-out problems: "
                f"{self.diff:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}] (95% CI), {self.gained} gained, {self.lost} lost, "
                f"McNemar p = {self.p_value:.2g}")


def accuracy_change(before: list[float], after: list[float]) -> AccuracyChange:
    """Paired comparison of per-problem correctness (0/1) on the same problems."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.size == 0:
        raise ValueError(f"need the same problems before and after, got {b.size} and {a.size}")
    d = a - b
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(d.size) if d.size > 1 else math.inf
    gained, lost = int(((b < 0.5) & (a >= 0.5)).sum()), int(((b >= 0.5) & (a < 0.5)).sum())
    p = float(stats.binomtest(gained, gained + lost, 0.5).pvalue) if gained + lost else 1.0
    return AccuracyChange(float(b.mean()), float(a.mean()), float(d.mean()), float(d.mean()) - half,
                          float(d.mean()) + half, gained, lost, p, int(d.size))
