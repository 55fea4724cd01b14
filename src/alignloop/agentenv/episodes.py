"""`Episodes`: a batch of agent episodes, one sandbox each, behind reset / step / close (+ snapshot,
restore); what the RL loop plays, here or behind `alignloop env serve`.

`reset(tasks)` starts one sandbox per task (in parallel) holding a private copy of its repository
and returns each episode's first conversation: the system message with the tools, and the task.
`step(actions)` takes one assistant reply per episode (None: already done), parses its tool calls
in the policy's chat family, runs them in the episode's sandbox (a turn's calls in parallel, the
episodes in parallel) and answers with `tool` turns. An episode ends when a reply has no tool
call, when it has used `max_turns` replies (its last reply's calls still run), or when its sandbox
dies; it is then graded: the share of its tests passing (the grader's copies of the test files
put back first) minus `penalty` per malformed tool call (at most 0.5 in all). A dead sandbox
grades as 0 and says why in `errors`.

Everything crossing the boundary is JSON-able (tasks, messages, `EpisodeStep`, `Snapshot`), so the
HTTP server and client carry it as it is.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from alignloop.agentenv.limits import AgentEnvError, SandboxError, SandboxLimits
from alignloop.agentenv.sandbox import Sandbox, Snapshot
from alignloop.agentenv.tasks import Task
from alignloop.agentenv.tools import (
    TOOL_NAMES,
    TOOLS,
    call_tools,
    code_block_calls,
    malformed_calls,
    system_prompt,
)
from alignloop.chat.parse import parse_assistant

MAX_PENALTY = 0.5


@dataclass
class EpisodeStep:
    observations: list[list[dict] | None]   # the conversation to answer next; None when done
    rewards: list[float]
    done: list[bool]
    info: list[dict[str, float]] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)   # why an episode ended abnormally

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EpisodeStep:
        return cls(**data)


@dataclass
class _Episode:
    task: Task
    sandbox: Sandbox | None = None
    conversation: list[dict] = field(default_factory=list)
    turns: int = 0
    calls: int = 0
    malformed: int = 0
    done: bool = False
    error: str | None = None


class Episodes:
    def __init__(self, family: str = "qwen2.5", limits: SandboxLimits | None = None, max_turns: int = 4,
                 max_calls: int = 4, penalty: float = 0.1, parallel: bool = True, workers: int = 8,
                 tools: list[str] | None = None, code_blocks: bool = False) -> None:
        """`tools`: the names of the tools offered (default: all); a call to another is malformed.
        `code_blocks`: a reply without tool calls but with fenced Python blocks writes them to the
        files they name (`tools.code_block_calls`), and the episode is graded at once."""
        self.family, self.limits = family, limits or SandboxLimits()
        self.max_turns, self.max_calls, self.penalty = max_turns, max_calls, penalty
        self.parallel, self.workers, self.code_blocks = parallel, workers, code_blocks
        unknown = sorted(set(tools or ()) - set(TOOL_NAMES))
        if unknown:
            raise AgentEnvError(f"unknown tools {', '.join(unknown)}: expected some of {', '.join(TOOL_NAMES)}")
        self.tools = [t for t in TOOLS if tools is None or t["function"]["name"] in tools]
        self.system = system_prompt(family, self.tools)
        self._episodes: list[_Episode] = []

    # --- the interface -----------------------------------------------------------------------
    def reset(self, tasks: list[Task]) -> list[list[dict]]:
        self.close()
        self._episodes = [_Episode(t) for t in tasks]
        self._each(self._start, range(len(tasks)))
        for e in self._episodes:
            e.conversation = [{"role": "system", "content": self.system},
                              {"role": "user", "content": e.task.description}]
        return [list(e.conversation) for e in self._episodes]

    def step(self, actions: list[str | None]) -> EpisodeStep:
        if len(actions) != len(self._episodes):
            raise AgentEnvError(f"step got {len(actions)} actions for {len(self._episodes)} episodes")
        results = self._each(lambda i: self._step_one(i, actions[i]), range(len(actions)))
        out = EpisodeStep([], [], [], [], [])
        for obs, reward, done, info, error in results:
            out.observations.append(obs)
            out.rewards.append(reward)
            out.done.append(done)
            out.info.append(info)
            out.errors.append(error)
        return out

    def close(self) -> None:
        for e in self._episodes:
            if e.sandbox is not None:
                e.sandbox.close()
        self._episodes = []

    def snapshot(self, episode: int) -> Snapshot:
        return self._sandbox(episode).snapshot()

    def restore(self, episode: int, snapshot: Snapshot) -> None:
        """Episode `episode` continues from `snapshot` in a fresh sandbox (its conversation stays)."""
        e = self._get(episode)
        fresh = Sandbox.restore(snapshot, self.limits)
        if e.sandbox is not None:
            e.sandbox.close()
        e.sandbox, e.error, e.done = fresh, None, False

    def call(self, episode: int, name: str, arguments: dict) -> str:
        """One tool call outside any turn (benchmarks, debugging): the tool turn's content."""
        return call_tools(self._sandbox(episode), [(name, arguments)])[0].content

    def calls(self, episode: int, calls: list[tuple[str, dict]], parallel: bool = True) -> list[str]:
        return [r.content for r in call_tools(self._sandbox(episode), calls, parallel)]

    @property
    def start_seconds(self) -> list[float]:
        return [e.sandbox.start_seconds for e in self._episodes if e.sandbox is not None]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside ------------------------------------------------------------------------------
    def _each(self, fn: Any, items: Any) -> list:
        items = list(items)
        if not self.parallel or len(items) < 2:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(min(self.workers, len(items))) as pool:
            return list(pool.map(fn, items))

    def _get(self, episode: int) -> _Episode:
        if not 0 <= episode < len(self._episodes):
            raise AgentEnvError(f"no episode {episode}: there are {len(self._episodes)}")
        return self._episodes[episode]

    def _sandbox(self, episode: int) -> Sandbox:
        e = self._get(episode)
        if e.sandbox is None:
            raise SandboxError(e.error or "the episode has no sandbox")
        return e.sandbox

    def _start(self, i: int) -> None:
        e = self._episodes[i]
        try:
            e.sandbox = Sandbox(self.limits).start(e.task.files)
        except SandboxError as err:  # one sandbox that cannot start ends its episode, not the batch
            e.error = str(err)

    def _step_one(self, i: int, text: str | None) -> tuple:
        e = self._episodes[i]
        if text is None or e.done:
            return None, 0.0, True, {}, e.error
        message = parse_assistant(text, self.family, tools=self.tools)
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or []]
        e.malformed += malformed_calls(text, self.family, len(calls))
        e.turns += 1
        # The reply's own text is the content: the next prompt must extend the tokens the policy sampled.
        turn: dict = {"role": "assistant", "content": text}
        if message.get("tool_calls"):
            turn["tool_calls"] = message["tool_calls"]
        e.conversation.append(turn)
        info = {"tool_calls": float(len(calls))}
        if not calls and self.code_blocks and e.sandbox is not None and e.error is None:
            sources = sorted(k for k in e.task.files if not k.startswith("tests/"))
            for r in call_tools(e.sandbox, code_block_calls(text, sources)[-1:], self.parallel):
                e.error = e.error or r.sandbox_error
            info["code_block_edit"] = float(bool(code_block_calls(text, sources)))
        if calls and e.sandbox is not None and e.error is None:
            over = calls[self.max_calls:]
            results = call_tools(e.sandbox, calls[:self.max_calls], self.parallel, self.tools)
            e.calls += len(results)
            for r in results:
                e.malformed += r.malformed
                e.error = e.error or r.sandbox_error
                e.conversation.append({"role": "tool", "name": r.name, "content": r.content})
            for name, _ in over:
                e.conversation.append({"role": "tool", "name": name, "content": json.dumps(
                    {"error": f"not run: at most {self.max_calls} tool calls per reply"})})
        if calls and e.turns < self.max_turns and e.error is None:
            return list(e.conversation), 0.0, False, info, None
        e.done = True
        pass_rate = self._grade(e)
        reward = pass_rate - min(MAX_PENALTY, self.penalty * e.malformed)
        info.update(pass_rate=pass_rate, malformed=float(e.malformed), turns=float(e.turns),
                    sandbox_error=float(e.error is not None))
        if e.sandbox is not None:
            e.sandbox.close()
        return None, reward, True, info, e.error

    def _grade(self, e: _Episode) -> float:
        if e.sandbox is None or e.error is not None:
            return 0.0
        try:
            report = e.sandbox.call("test", files=e.task.test_files)
        except (SandboxError, AgentEnvError) as err:
            e.error = f"grading failed: {err}"
            return 0.0
        return e.task.grade(report)
