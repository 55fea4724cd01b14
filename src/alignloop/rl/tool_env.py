"""Tool-call environment interface: the policy calls tools, the environment runs them.

The policy's reply is parsed by the chat layer (`parse_assistant`, per chat family, arguments
typed by each tool's JSON schema). Tool calls are executed by the environment and their results
appended as `tool` turns, and the policy goes on; a reply without tool calls ends the episode and
is scored by `judge(task, messages)`. Tools are plain Python callables behind the `tools`
mapping (a sandboxed tool would plug in there too). A tool that raises becomes an error result
the policy sees (as a real tool would answer), not a crash of the run.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field

from alignloop.chat.parse import parse_assistant
from alignloop.rl.arithmetic import ArithmeticEnv, score
from alignloop.rl.env import EnvSectionBase, Step


class ToolEnv:
    name = "tools"

    def __init__(self, tasks: Callable[[int, int], list[Any]], first_messages: Callable[[Any], list[dict]],
                 tools: dict[str, Callable[..., Any]], schemas: list[dict], family: str,
                 judge: Callable[[Any, list[dict]], float], max_calls: int = 4) -> None:
        self._tasks, self._first = tasks, first_messages
        self.tools, self.schemas, self.family = tools, schemas, family
        self.judge = judge
        self.max_calls = max_calls
        self._episodes: list[Any] = []
        self._conversations: list[list[dict]] = []
        self._calls: list[int] = []

    def sample_tasks(self, n: int, seed: int) -> list[Any]:
        return self._tasks(n, seed)

    def reset(self, tasks: list[Any]) -> list[list[dict]]:
        self._episodes = list(tasks)
        self._conversations = [self._first(t) for t in tasks]
        self._calls = [0] * len(tasks)
        return [list(c) for c in self._conversations]

    def run_tool(self, name: str, arguments: Any) -> str:
        fn = self.tools.get(name)
        if fn is None:
            return json.dumps({"error": f"unknown tool {name!r}"})
        try:
            result = fn(**arguments) if isinstance(arguments, dict) else fn(arguments)
        except Exception as e:  # noqa: BLE001 the policy's mistake (bad arguments), shown to it like a real tool would
            return json.dumps({"error": f"{type(e).__name__}: {e}"})
        return result if isinstance(result, str) else json.dumps(result)

    def step(self, actions: list[str | None]) -> Step:
        n = len(actions)
        rewards, done = np.zeros(n), np.ones(n, dtype=bool)
        obs: list[list[dict] | None] = [None] * n
        info: list[dict] = [{} for _ in range(n)]
        for i, text in enumerate(actions):
            if text is None:
                continue
            message = parse_assistant(text, self.family, tools=self.schemas)
            calls = message.get("tool_calls") or []
            # The reply's own text stays the content: the next prompt must extend the tokens the policy
            # sampled, and a template re-rendering a parsed call differently would break that.
            turn = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
            conversation = self._conversations[i] + [turn]
            if calls and self._calls[i] < self.max_calls:
                self._calls[i] += len(calls)
                for call in calls:
                    fn = call["function"]
                    conversation.append({"role": "tool", "name": fn["name"],
                                         "content": self.run_tool(fn["name"], fn["arguments"])})
                done[i] = False
                obs[i] = conversation
            else:
                rewards[i] = float(self.judge(self._episodes[i], conversation))
            self._conversations[i] = conversation
            info[i] = {"tool_calls": float(len(calls))}
        return Step(obs, rewards, done, info)


CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}

TOOL_SYSTEM = ("You can use a calculator. To call it, write <tool_call>{\"name\": \"calculator\", \"arguments\": "
               "{\"expression\": \"2 + 3\"}}</tool_call> and wait for the result. "
               "End your final reply with 'Answer: ' followed by the number only.")


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float | int:
    """+ - * / and parentheses on numbers, nothing else (no eval of arbitrary code)."""
    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    result = value(ast.parse(str(expression), mode="eval").body)
    return int(result) if float(result).is_integer() else result


def calculator_env(max_operand: int = 50, family: str = "qwen2.5", max_calls: int = 2) -> ToolEnv:
    """Arithmetic problems with a calculator tool; the final reply is scored like the arithmetic task."""
    arithmetic = ArithmeticEnv(max_operand)

    def first(problem) -> list[dict]:
        return [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": problem.question}]

    def judge(problem, conversation: list[dict]) -> float:
        return score(conversation[-1].get("content") or "", problem.answer)[0]

    env = ToolEnv(arithmetic.sample_tasks, first, {"calculator": calculate}, [CALCULATOR], family, judge, max_calls)
    env.name = "tools"
    return env


class ToolEnvSection(EnvSectionBase):
    """`[env] kind = "tool"`: arithmetic problems with a calculator the policy may call."""

    kind: Literal["tool"] = "tool"
    max_operand: int = Field(50, ge=2, description="operands are drawn from 2..max_operand")
    tool_family: str = Field("qwen2.5", description="chat family whose tool-call syntax the replies are parsed in")
    max_tool_calls: int = Field(2, ge=1)

    def build(self, prompts: list[list[dict]] | None = None) -> ToolEnv:
        return calculator_env(self.max_operand, family=self.tool_family, max_calls=self.max_tool_calls)
