"""The agent's tools: JSON schemas (OpenAI style), the system prompt that shows them, and the
dispatcher that runs a turn's tool calls in one sandbox, in parallel.

Every tool runs inside the episode's sandbox except the search's embedding (the files are read
inside, ranked on the host). A tool result is always a string for a `tool` turn: JSON of what the
tool returned, or {"error": ...} when the call was bad (unknown tool, wrong arguments, a path
outside the repository, ...). Calls that are bad in form (unknown tool, arguments that do not
fit the schema, an unparseable call) count as malformed; the episode's reward pays for them.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from alignloop.agentenv.limits import AgentEnvError, SandboxError
from alignloop.agentenv.sandbox import Sandbox
from alignloop.agentenv.search import shared_search
from alignloop.chat.families import get_family


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_PATH = {"type": "string", "description": "path relative to the repository root"}
TOOLS: list[dict] = [
    _tool("read_file", "Read a file of the repository.", {"path": _PATH}, ["path"]),
    _tool("write_file", "Create or overwrite a file with the given content.",
          {"path": _PATH, "content": {"type": "string"}}, ["path", "content"]),
    _tool("edit_file", "Replace the one occurrence of `old` in a file with `new`.",
          {"path": _PATH, "old": {"type": "string"}, "new": {"type": "string"}}, ["path", "old", "new"]),
    _tool("grep", "Lines matching a regular expression, as path:line: text.",
          {"pattern": {"type": "string"}, "path": {**_PATH, "default": "."}}, ["pattern"]),
    _tool("search", "The parts of the repository nearest in meaning to a query.",
          {"query": {"type": "string"}, "k": {"type": "integer", "default": 3}}, ["query"]),
    _tool("run", "Run a shell command in the repository (bash; state such as cd and export persists).",
          {"command": {"type": "string"}, "timeout": {"type": "number", "description": "seconds"}}, ["command"]),
    _tool("lint", "Lint errors (ruff: syntax errors, undefined names, unused imports).", {"path": _PATH}, []),
    _tool("run_tests", "Run the repository's tests; which pass and which fail, with why.", {}, []),
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

SYSTEM = ("You are a coding agent working in a Python repository. You may call tools. To call one, write "
          "it like this example (a tool named get_weather):\n{example}\nSeveral calls in one reply run in parallel; "
          "their results come back next. Reply without a tool call when you are done.\n\n# Tools\n\n<tools>\n"
          "{tools}\n</tools>")


def system_prompt(family: str = "qwen2.5", tools: list[dict] | None = None) -> str:
    """The system message listing the tools (one JSON schema a line, as Hermes-style templates do)
    with the chat family's own tool-call syntax as the example (the chat layer knows each family's)."""
    syntax = get_family(family).tool_calls
    if syntax is None:
        raise AgentEnvError(f"chat family {family!r} has no tool-call syntax; pick one that does (e.g. qwen2.5)")
    listed = "\n".join(json.dumps(t["function"]) for t in (tools or TOOLS))
    return SYSTEM.replace("{example}", syntax.example).replace("{tools}", listed)


_FENCE = re.compile(r"(?:^|\n)([^\n]*)\n?```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_FILE = re.compile(r"([\w./-]+\.py)\b")


def code_block_calls(text: str, sources: list[str]) -> list[tuple[str, dict]]:
    """The "whole file" edit format, for policies too small to write JSON tool calls: each fenced
    Python block becomes write_file of the file named on the line before it, or of the repository's
    only source file when none is named; a block naming no known file is ignored."""
    calls = []
    for before, body in _FENCE.findall(text):
        named = _FILE.findall(before)
        path = named[-1] if named and named[-1] in sources else (sources[0] if len(sources) == 1 and not named
                                                                 else None)
        if path is not None and body.strip():
            calls.append(("write_file", {"path": path, "content": body}))
    return calls


def malformed_calls(text: str, family: str, parsed: int) -> int:
    """Calls the policy opened but the parser could not read (its markers minus the calls parsed)."""
    syntax = get_family(family).tool_calls
    if syntax is None or not syntax.start:
        return 0
    return max(0, text.count(syntax.start) - parsed)


@dataclass
class ToolResult:
    name: str
    content: str            # what the `tool` turn says
    malformed: bool = False
    sandbox_error: str | None = None  # the sandbox died or stopped answering during the call


def _check(name: str, arguments: Any, offered: list[dict]) -> str | None:
    """Why the call does not fit its schema among the `offered` tools (None: it does)."""
    schema = next((t["function"]["parameters"] for t in offered if t["function"]["name"] == name), None)
    if schema is None:
        return f"unknown tool {name!r}; tools: {', '.join(t['function']['name'] for t in offered)}"
    if not isinstance(arguments, dict):
        return "arguments must be a JSON object"
    missing = [k for k in schema["required"] if k not in arguments]
    extra = [k for k in arguments if k not in schema["properties"]]
    if missing or extra:
        return f"{name}: " + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                       + ([f"unknown {', '.join(extra)}"] if extra else []))
    for key, value in arguments.items():
        kind = schema["properties"][key]["type"]
        ok = {"string": isinstance(value, str), "integer": isinstance(value, int) and not isinstance(value, bool),
              "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
        if not ok:
            return f"{name}: {key} should be a {kind}"
    return None


def call_tool(sandbox: Sandbox, name: str, arguments: Any, offered: list[dict] | None = None) -> ToolResult:
    """Run one tool call in `sandbox` (`offered`: the tools the policy was shown, default all); never
    raises for the policy's mistakes or the sandbox's death."""
    problem = _check(name, arguments, offered or TOOLS)
    if problem is not None:
        return ToolResult(name, json.dumps({"error": problem}), malformed=True)
    args = dict(arguments)
    try:
        if name == "read_file":
            result = sandbox.call("read", path=args["path"])
        elif name == "write_file":
            result = sandbox.call("write", path=args["path"], content=args["content"])
        elif name == "edit_file":
            result = sandbox.call("edit", **args)
        elif name == "grep":
            result = sandbox.call("grep", **args)
        elif name == "search":
            files = sandbox.call("files")["files"]
            result = {"results": shared_search().search(files, args["query"], int(args.get("k", 3)))}
        elif name == "run":
            result = sandbox.call("run", **args)
        elif name == "lint":
            result = sandbox.call("lint", **args)
        else:  # run_tests
            result = sandbox.call("test")
    except SandboxError as e:
        return ToolResult(name, json.dumps({"error": str(e)}), sandbox_error=str(e))
    except AgentEnvError as e:  # the agent's answer to a bad call (path outside, bad regex, ...)
        return ToolResult(name, json.dumps({"error": str(e)}))
    return ToolResult(name, json.dumps(result))


def call_tools(sandbox: Sandbox, calls: list[tuple[str, Any]], parallel: bool = True,
               offered: list[dict] | None = None) -> list[ToolResult]:
    """A turn's calls, in the order given; run at once (threads; the agent serves them concurrently)
    unless `parallel` is False."""
    if not parallel or len(calls) < 2:
        return [call_tool(sandbox, n, a, offered) for n, a in calls]
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: call_tool(sandbox, *c, offered), calls))
