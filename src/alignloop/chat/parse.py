"""Parse an assistant's generated text back into an OpenAI-style message, per chat family.

``parse_assistant(text, family)`` turns what a model wrote after the generation prompt into::

    {"role": "assistant", "content": str | None,
     "reasoning_content": str,                # only when there was (non-empty) reasoning
     "tool_calls": [{"type": "function", "id": str (only when the format carries one),
                     "function": {"name": str, "arguments": dict}}]}   # only when there were calls

Conventions (the same for every family):

* ``prefix`` is what the generation prompt pre-filled after the assistant header (QwQ's
  ``"<think>\\n"``, DeepSeek-V3.1's ``"</think>"``); it is parsed as if the model had written it.
  Text that closes a reasoning block it never opened is still read as reasoning.
* Everything from the first end-of-turn string (or the start of another turn) on is ignored, so
  trailing ``<|im_end|>``, ``</s>``, ``<|eot_id|>``… disappear.
* Content and reasoning are stripped of surrounding whitespace. ``content`` is ``None`` when the
  message has tool calls and no text, ``""`` when it has neither.
* Tool-call arguments are decoded to a dict (DeepSeek writes them as a JSON string) and typed by
  the tool's JSON schema when ``tools`` are given: ``"3"`` becomes ``3`` for an integer parameter,
  ``"true"`` becomes ``True`` for a boolean one, and so on (:func:`coerce_arguments`).
* A tool call that cannot be decoded is kept, as written, in ``content``.

:class:`StreamParser` gives the same final answer incrementally; intermediate results never show a
half-received control string, nor a tool call before it is complete.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from alignloop.chat.families import Family, get_family
from alignloop.chat.normalize import json_or

__all__ = ["StreamParser", "coerce_arguments", "parse_assistant", "tool_schemas"]

_DECODER = json.JSONDecoder()


# --------------------------------------------------------------------------------------------------
# Tool schemas and argument typing
# --------------------------------------------------------------------------------------------------

_COHERE_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "dict": "object", "list": "array"}


def tool_schemas(tools: list[dict] | None) -> dict[str, dict]:
    """Map tool name -> JSON schema of its parameters, from OpenAI-style tool dicts
    (``{"type": "function", "function": {...}}`` or the bare function dict). Cohere's
    ``parameter_definitions`` are converted on the fly."""
    out: dict[str, dict] = {}
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        name = fn.get("name")
        if not isinstance(name, str):
            continue
        params = fn.get("parameters")
        if not isinstance(params, dict) and isinstance(fn.get("parameter_definitions"), dict):
            props = {}
            for pname, spec in fn["parameter_definitions"].items():
                spec = spec if isinstance(spec, dict) else {}
                props[pname] = {"type": _COHERE_TYPES.get(str(spec.get("type", "")).lower(), spec.get("type"))}
            params = {"type": "object", "properties": props}
        out[name] = params if isinstance(params, dict) else {}
    return out


_FAIL = object()


def _is_type(value: Any, t: str) -> bool:
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    return False


def _convert(value: Any, t: str) -> Any:
    """Convert ``value`` to JSON type ``t`` when that is unambiguous; ``_FAIL`` otherwise."""
    if t in ("integer", "number"):
        if isinstance(value, str):
            s = value.strip()
            try:
                return int(s)
            except ValueError:
                pass
            try:
                f = float(s)
            except ValueError:
                return _FAIL
            if not math.isfinite(f):
                return _FAIL
            value = f
        if isinstance(value, float) and t == "integer":
            return int(value) if value.is_integer() else _FAIL
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return _FAIL
    if t == "boolean":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return _FAIL
    if t == "null":
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            return None
        return _FAIL
    if t == "string":
        if isinstance(value, (bool, int, float)) or isinstance(value, (list, dict)):
            return json.dumps(value, ensure_ascii=False)
        return _FAIL
    if t in ("array", "object"):
        if isinstance(value, str):
            return json_or(value, lambda decoded: _is_type(decoded, t), _FAIL)
        return _FAIL
    return _FAIL


def _types_of(schema: dict) -> list[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return [t]
    if isinstance(t, list):
        return [x for x in t if isinstance(x, str)]
    if "properties" in schema or "additionalProperties" in schema:
        return ["object"]
    if "items" in schema:
        return ["array"]
    return []


def _matches(value: Any, schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return any(_matches(value, s) for s in schema[key])
    types = _types_of(schema)
    return not types or any(_is_type(value, t) for t in types)


def _coerce(value: Any, schema: Any) -> Any:
    if not isinstance(schema, dict):
        return value
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            for option in options:  # already valid for one of them: keep, only recurse
                if _matches(value, option):
                    return _coerce(value, option)
            for option in options:
                converted = _coerce(value, option)
                if _matches(converted, option):
                    return converted
            return value
    types = _types_of(schema)
    if not types:
        return value
    for t in types:
        if _is_type(value, t):
            return _recurse(value, t, schema)
    for t in types:
        converted = _convert(value, t)
        if converted is not _FAIL:
            return _recurse(converted, t, schema)
    return value


def _recurse(value: Any, t: str, schema: dict) -> Any:
    if t == "object" and isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        extra = schema.get("additionalProperties")
        return {k: _coerce(v, props[k] if k in props else extra) for k, v in value.items()}
    if t == "array" and isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, list):  # tuple form
            return [_coerce(v, items[i]) if i < len(items) else v for i, v in enumerate(value)]
        return [_coerce(v, items) for v in value]
    return value


def coerce_arguments(arguments: Any, parameters_schema: dict | None) -> Any:
    """Type ``arguments`` (a dict, or a JSON string of one) by a tool's parameters schema.

    Values that already have an allowed type are kept; otherwise an unambiguous conversion is
    applied (numeric strings to numbers, ``"true"``/``"false"`` to booleans, JSON strings to
    arrays/objects, scalars to strings). Anything else is left as it is.
    """
    if isinstance(arguments, str):
        decoded = _arguments_json(arguments)
        if decoded is _FAIL:
            return arguments
        arguments = decoded
    if not isinstance(parameters_schema, dict):
        return arguments
    schema = parameters_schema if _types_of(parameters_schema) else {**parameters_schema, "type": "object"}
    return _coerce(arguments, schema)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _json_at(text: str, pos: int = 0) -> tuple[Any, int] | None:
    """Decode one JSON value starting at ``pos`` (after whitespace); ``(value, end)`` or ``None``."""
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    try:
        return _DECODER.raw_decode(text, pos)
    except ValueError:
        return None


def _arguments_json(text: str) -> Any:
    """Tool-call arguments given as a JSON string, decoded (a blank string is no arguments), or `_FAIL`."""
    return json_or(text, lambda _: True, _FAIL) if text.strip() else {}


def _make_call(name: Any, arguments: Any, tools: dict[str, dict], call_id: Any = None) -> dict | None:
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip()
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        arguments = _arguments_json(arguments)  # _FAIL is no dict
    if not isinstance(arguments, dict):
        return None
    if name in tools:
        arguments = coerce_arguments(arguments, tools[name])
    call: dict[str, Any] = {"type": "function"}
    if isinstance(call_id, str) and call_id:
        call["id"] = call_id
    call["function"] = {"name": name, "arguments": arguments}
    return call


def _call_from_obj(obj: Any, tools: dict[str, dict], keys=("arguments", "parameters")) -> dict | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" in obj["function"]:  # OpenAI-shaped
        inner = obj["function"]
        return _make_call(inner.get("name"), inner.get("arguments", inner.get("parameters")), tools, obj.get("id"))
    name = obj.get("name", obj.get("tool_name"))
    args = next((obj[k] for k in keys if k in obj), None)
    return _make_call(name, args, tools, obj.get("id"))


def _calls_from_list(value: Any, tools: dict[str, dict]) -> list[dict] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_obj(item, tools) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


class _Parsed:
    """Mutable scratch result of one parse."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: list[dict] = []

    def message(self) -> dict:
        content = "".join(self.content).strip()
        reasoning = "\n".join(r.strip() for r in self.reasoning if r.strip())
        msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not self.calls) else None}
        if reasoning:
            msg["reasoning_content"] = reasoning
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg


# --------------------------------------------------------------------------------------------------
# Tool-call styles. Each takes the text after the reasoning and fills ``out``.
# ``partial``: more text may follow, so incomplete calls are hidden rather than shown as content.
# --------------------------------------------------------------------------------------------------


def _tools_hermes(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    start, end = fam.tool_calls.start, fam.tool_calls.end  # type: ignore[union-attr]
    pos = 0
    while True:
        i = text.find(start, pos)
        if i < 0:
            out.content.append(text[pos:])
            return
        out.content.append(text[pos:i])
        j = text.find(end, i + len(start))
        body = text[i + len(start) : j if j >= 0 else len(text)]
        if j < 0 and partial:
            return
        decoded = _json_at(body)
        call = None
        if decoded is not None and not body[decoded[1] :].strip():
            call = _call_from_obj(decoded[0], tools)
        if call is None:
            if partial:
                return
            out.content.append(text[i : j + len(end) if j >= 0 else len(text)])
        else:
            out.calls.append(call)
        if j < 0:
            return
        pos = j + len(end)


def _tools_json_after_marker(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    """``[TOOL_CALLS] [...]`` (Mistral), ``<|tool_call|>[...]`` (Granite), ``functools[...]`` (Phi-4-mini)."""
    start = fam.tool_calls.start  # type: ignore[union-attr]
    i = text.find(start)
    if fam.tool_calls.style == "json-list" and start.isalnum():  # a plain word: demand the JSON right after it
        while i >= 0 and not text[i + len(start) :].lstrip().startswith("[") and text[i + len(start) :].strip():
            i = text.find(start, i + 1)
    if i < 0:
        out.content.append(text)
        return
    out.content.append(text[:i])
    pos = i
    while pos < len(text):
        if not text.startswith(start, pos):
            rest = text[pos:]
            if rest.strip():
                out.content.append(rest)
            return
        decoded = _json_at(text, pos + len(start))
        calls = _calls_from_list(decoded[0], tools) if decoded else None
        if calls is None:
            if not partial:
                out.content.append(text[pos:])
            return
        out.calls.extend(calls)
        pos = decoded[1]  # type: ignore[index]
        while pos < len(text) and text[pos].isspace():
            pos += 1


def _tools_mistral_v11(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    start = "[TOOL_CALLS]"
    i = text.find(start)
    if i < 0:
        out.content.append(text)
        return
    out.content.append(text[:i])
    segments = text[i + len(start) :].split(start)
    for k, seg in enumerate(segments):
        raw = start + seg
        if seg.lstrip().startswith("["):  # older JSON-list form
            decoded = _json_at(seg)
            calls = _calls_from_list(decoded[0], tools) if decoded else None
            if calls is None:
                if not partial:
                    out.content.append(raw)
                return
            out.calls.extend(calls)
            continue
        a = seg.find("[ARGS]")
        if a < 0:
            if not partial:
                out.content.append(raw)
            return
        head = seg[:a]
        name, _, call_id = head.partition("[CALL_ID]")
        decoded = _json_at(seg, a + len("[ARGS]"))
        call = _make_call(name, decoded[0], tools, call_id.strip() or None) if decoded else None
        if call is None:
            if not partial:
                out.content.append(raw)
            return
        out.calls.append(call)
        tail = seg[decoded[1] :]  # type: ignore[index]
        if tail.strip():
            out.content.append(tail)


_PY_CALL = re.compile(r"^\s*([A-Za-z_][\w.]*)\.call\((.*)\)\s*$", re.S)


def _python_call(text: str, tools: dict) -> dict | None:
    """Llama-3's built-in tool form ``brave_search.call(query="...")``."""
    m = _PY_CALL.match(text)
    if not m:
        return None
    try:
        node = ast.parse(f"f({m.group(2)})", mode="eval").body
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}  # type: ignore[attr-defined]
    except (SyntaxError, ValueError):
        return None
    if any(k is None for k in args):
        return None
    return _make_call(m.group(1), args, tools)


def _tools_llama3(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    tag = "<|python_tag|>"
    i = text.find(tag)
    if i >= 0:
        before, body = text[:i], text[i + len(tag) :]
    else:
        before, body = "", text
        if not body.lstrip().startswith("{"):
            out.content.append(text)
            return
    calls = _llama_json_calls(body, tools, require_known=i < 0)
    if calls is None and i >= 0:
        single = _python_call(body, tools)
        calls = [single] if single else None
    if calls is not None:
        out.content.append(before)
        out.calls.extend(calls)
        return
    if partial:  # may still become a call: show nothing of it yet
        out.content.append(before)
        return
    out.content.append(text)


def _llama_json_calls(body: str, tools: dict, require_known: bool) -> list[dict] | None:
    calls: list[dict] = []
    pos = 0
    while True:
        decoded = _json_at(body, pos)
        if decoded is None:
            return None
        value, pos = decoded
        for obj in value if isinstance(value, list) else [value]:
            if not isinstance(obj, dict) or "name" not in obj or not ({"parameters", "arguments"} & obj.keys()):
                return None
            if require_known and tools and obj["name"] not in tools:
                return None
            call = _call_from_obj(obj, tools, keys=("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
        rest = body[pos:].lstrip()
        if not rest:
            return calls
        if rest.startswith(";"):
            pos = len(body) - len(rest) + 1
            continue
        if rest.startswith("{"):
            pos = len(body) - len(rest)
            continue
        return None


_DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
_DS_CALLS_END = "<｜tool▁calls▁end｜>"
_DS_CALL_BEGIN = "<｜tool▁call▁begin｜>"
_DS_CALL_END = "<｜tool▁call▁end｜>"
_DS_SEP = "<｜tool▁sep｜>"
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n?(.*?)\n?\s*```\s*$", re.S)


def _deepseek_call(seg: str, tools: dict) -> dict | None:
    left, sep, right = seg.partition(_DS_SEP)
    if not sep:
        return None
    if "```" in right:  # V3 / R1: type<sep>name\n```json\n{...}\n```
        name, _, fenced = right.partition("\n")
        m = _FENCE.match(fenced)
        args_text = m.group(1) if m else fenced
    else:  # V3.1: name<sep>{...}
        name, args_text = left, right
    try:
        args = json.loads(args_text)
    except ValueError:
        return None
    return _make_call(name, args, tools)


def _tools_deepseek(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    starts = [i for i in (text.find(_DS_CALLS_BEGIN), text.find(_DS_CALL_BEGIN)) if i >= 0]
    if not starts:
        out.content.append(text)
        return
    i = min(starts)
    out.content.append(text[:i])
    body = text[i:]
    if body.startswith(_DS_CALLS_BEGIN):
        body = body[len(_DS_CALLS_BEGIN) :]
    end = body.find(_DS_CALLS_END)
    if end >= 0:
        body = body[:end]
    pos = 0
    while True:
        b = body.find(_DS_CALL_BEGIN, pos)
        if b < 0:
            return
        e = body.find(_DS_CALL_END, b)
        if e < 0 and partial:
            return
        seg = body[b + len(_DS_CALL_BEGIN) : e if e >= 0 else len(body)]
        call = _deepseek_call(seg, tools)
        if call is None:
            if not partial:
                out.content.append(body[b:])
            return
        out.calls.append(call)
        if e < 0:
            return
        pos = e + len(_DS_CALL_END)


def _tools_cohere(text: str, fam: Family, tools: dict, partial: bool, out: _Parsed) -> None:
    marker = "Action:"
    search = 0
    while True:
        i = text.find(marker, search)
        if i < 0:
            out.content.append(text)
            return
        after = text[i + len(marker) :]
        a = after.lstrip()
        if a.startswith("```") or a.startswith("["):
            break
        if partial and "```json".startswith(a):  # the fence may still be on its way
            out.content.append(text[:i])
            return
        search = i + 1
    out.content.append(text[:i])
    pos = len(text) - len(a)
    fenced = a.startswith("```")
    if fenced:
        nl = text.find("\n", pos)
        bracket = text.find("[", pos)
        if bracket < 0:
            if not partial:
                out.content.append(text[i:])
            return
        pos = bracket if nl < 0 else min(bracket, nl + 1)
    decoded = _json_at(text, pos)
    calls = _calls_from_list(decoded[0], tools) if decoded else None
    if calls is None:
        if not partial:
            out.content.append(text[i:])
        return
    out.calls.extend(calls)
    tail = text[decoded[1] :].lstrip()  # type: ignore[index]
    if fenced and tail.startswith("```"):
        tail = tail[3:]
    elif fenced and partial and "```".startswith(tail):  # the closing fence is still arriving
        tail = ""
    if tail.strip():
        out.content.append("\n" + tail)


_TOOL_STYLES = {
    "hermes": _tools_hermes,
    "mistral-json": _tools_json_after_marker,
    "json-list": _tools_json_after_marker,
    "mistral-v11": _tools_mistral_v11,
    "llama3-json": _tools_llama3,
    "deepseek": _tools_deepseek,
    "deepseek-v3.1": _tools_deepseek,
    "cohere-action": _tools_cohere,
}


# --------------------------------------------------------------------------------------------------
# Harmony (gpt-oss)
# --------------------------------------------------------------------------------------------------

_H_START, _H_MESSAGE, _H_CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
_H_TERMINATORS = ("<|end|>", "<|return|>", "<|call|>")
_H_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_H_RECIPIENT_RE = re.compile(r"to=([^\s<]+)")


def _parse_harmony(text: str, fam: Family, tools: dict, partial: bool) -> dict:
    out = _Parsed()
    t = text
    if t.startswith("<|start|>assistant"):
        t = t[len("<|start|>assistant") :]
    if _H_MESSAGE not in t and not t.lstrip().startswith(("<|", "to=")):
        # plain text without harmony structure: all of it is the answer
        cut = min([k for k in (t.find(s) for s in (*_H_TERMINATORS, _H_START)) if k >= 0], default=len(t))
        out.content.append(t[:cut])
        return out.message()
    pos = 0
    while True:
        m = t.find(_H_MESSAGE, pos)
        if m < 0:
            return out.message()  # header still incomplete (or nothing more)
        header = t[pos:m]
        body_start = m + len(_H_MESSAGE)
        ends = [(k, tok) for tok in _H_TERMINATORS if (k := t.find(tok, body_start)) >= 0]
        if ends:
            e, terminator = min(ends)
            body, nxt = t[body_start:e], e + len(terminator)
        else:
            terminator, body, nxt = None, t[body_start:], len(t)
        ch = _H_CHANNEL_RE.search(header)
        channel = ch.group(1) if ch else ""
        rc = _H_RECIPIENT_RE.search(header)
        recipient = rc.group(1) if rc else None
        if recipient and recipient != "assistant":
            if terminator is None and partial:
                return out.message()
            name = recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
            decoded = _json_at(body)
            call = None
            if decoded is not None and not body[decoded[1] :].strip():
                call = _make_call(name, decoded[0], tools)
            if call is not None:
                out.calls.append(call)
            elif not partial:
                out.content.append(body)
        elif channel == "analysis":
            out.reasoning.append(body)
        else:  # final, commentary preamble, or no channel
            if "".join(out.content).strip():
                out.content.append("\n")
            out.content.append(body)
        if terminator in ("<|return|>", "<|call|>") or terminator is None:
            return out.message()
        rest = t[nxt:]
        if not rest.startswith(_H_START + "assistant"):
            return out.message()
        pos = nxt + len(_H_START) + len("assistant")


# --------------------------------------------------------------------------------------------------
# The generic parser
# --------------------------------------------------------------------------------------------------


def _cut_turn(text: str, fam: Family) -> tuple[str, bool]:
    stops = [k for s in (*fam.end_of_turn, *fam.turn_starts, fam.eos_token) if s and (k := text.find(s)) >= 0]
    if stops:
        return text[: min(stops)], True
    return text, False


def _parse(text: str, fam: Family, tools: dict, partial: bool) -> dict:
    if fam.tool_calls is not None and fam.tool_calls.style == "harmony":
        return _parse_harmony(text, fam, tools, partial)
    for header in fam.assistant_headers:
        if text.startswith(header):
            text = text[len(header) :]
            break
    text, ended = _cut_turn(text, fam)
    partial = partial and not ended
    out = _Parsed()
    rest = text
    r = fam.reasoning
    if r is not None:
        stripped = text.lstrip()
        tool_start = text.find(fam.tool_calls.start) if fam.tool_calls and fam.tool_calls.start else -1
        close_at = text.find(r.close)
        if stripped.startswith(r.open):
            body = stripped[len(r.open) :]
            k = body.find(r.close)
            if k < 0:
                out.reasoning.append(body)
                rest = ""
            else:
                out.reasoning.append(body[:k])
                rest = body[k + len(r.close) :]
        elif close_at >= 0 and (tool_start < 0 or close_at < tool_start):
            out.reasoning.append(text[:close_at])  # the opening tag was pre-filled by the prompt
            rest = text[close_at + len(r.close) :]
        if r.answer_tags:
            a_open, a_close = r.answer_tags
            s = rest.lstrip()
            if s.startswith(a_open):
                s = s[len(a_open) :]
                k = s.find(a_close)
                rest = s if k < 0 else s[:k] + s[k + len(a_close) :]
    style = fam.tool_calls.style if fam.tool_calls is not None else None
    if style in _TOOL_STYLES:
        _TOOL_STYLES[style](rest, fam, tools, partial, out)
    else:
        out.content.append(rest)
    return out.message()


def parse_assistant(
    text: str, family: Family | str, tools: list[dict] | None = None, prefix: str = ""
) -> dict:
    """Parse the text a model generated after the generation prompt into an assistant message.

    ``family``: a :class:`Family` or its name. ``tools``: the OpenAI-style tool definitions offered to
    the model (used to type arguments). ``prefix``: what the generation prompt pre-filled after the
    assistant header (e.g. ``"<think>\\n"``).
    """
    fam = get_family(family)
    return _parse(prefix + text, fam, tool_schemas(tools), partial=False)


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------

_PREFIXES: dict[str, tuple[frozenset[str], int]] = {}


def _marker_prefixes(fam: Family) -> tuple[frozenset[str], int]:
    cached = _PREFIXES.get(fam.name)
    if cached is None:
        markers = set(fam.markers) | set(fam.assistant_headers)
        prefixes = frozenset(m[:k] for m in markers for k in range(1, len(m)))
        cached = (prefixes, max((len(m) for m in markers), default=1))
        _PREFIXES[fam.name] = cached
    return cached


def _hold_back(text: str, fam: Family) -> str:
    """``text`` without a trailing piece that may be the start of a control string."""
    prefixes, longest = _marker_prefixes(fam)
    for k in range(min(longest - 1, len(text)), 0, -1):
        if text[-k:] in prefixes:
            return text[:-k]
    return text


class StreamParser:
    """Incremental :func:`parse_assistant`.

    ``feed(delta)`` returns the message parsed from everything received so far. It never shows a
    half-received control string (``<|im_e``…) in content or reasoning, and shows a tool call only
    once it is complete. ``finish()`` returns exactly ``parse_assistant(full_text, family, tools,
    prefix)``. Pass the same ``prefix`` as you would to ``parse_assistant``; without it, reasoning
    whose opening tag was pre-filled shows as content until its closing tag arrives.
    """

    def __init__(self, family: Family | str, tools: list[dict] | None = None, prefix: str = "") -> None:
        self.family = get_family(family)
        self._tools = tool_schemas(tools)
        self._prefix = prefix
        self._text = ""

    @property
    def text(self) -> str:
        """The generated text received so far (without the prefix)."""
        return self._text

    def feed(self, delta: str) -> dict:
        self._text += delta
        return self.current()

    def current(self) -> dict:
        safe = _hold_back(self._prefix + self._text, self.family)
        return _parse(safe, self.family, self._tools, partial=True)

    def finish(self) -> dict:
        return _parse(self._prefix + self._text, self.family, self._tools, partial=False)
