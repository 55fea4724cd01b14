"""Make OpenAI-format messages safe for any chat template.

Chat logs arrive in OpenAI's shape, which real templates mishandle in a few known ways (see
shared/research/chat_templates.md section 3): the three below. `normalize_messages` repairs
exactly those, and leaves input that already renders well untouched:

1. Tool-call arguments given as a JSON string (OpenAI's wire format) become the decoded dict.
   Templates that print them with `tojson` (Llama 3.x, Qwen2.5/QwQ, Mistral Small 3.2, gpt-oss, ...)
   would otherwise print a JSON string of JSON, and templates that iterate them (`| items`) crash.
   A string that is not a JSON object is left as it is. Missing arguments (None) become `{}`.
   Some templates (the DeepSeek V3/R1 family) splice the arguments into text with `+` and so need a
   string: pass the template's source as `template=` and, for such templates, arguments are made
   JSON strings instead (dicts are encoded; strings are kept).
2. `content: None` on an assistant message becomes "" (OpenAI sends it on tool-call turns).
   transformers drops None-valued keys, so the template sees `content` as undefined, and most
   templates then crash on `'...' + message.content` (Qwen3, QwQ, DeepSeek, Phi, ChatML, SmolLM2,
   Granite, ... in the corpus). With "", every corpus template that renders the same turn with text
   content also renders it with None content, and none prints "None". (Dropping the key instead is
   exactly what transformers already does, so it would fix nothing.)
3. `tool_calls` that is None or an empty list is removed: Llama 3.x raises on an empty list
   ("only supports single tool-calls"), other templates open an empty tool-call section.

Everything else is kept as given, `reasoning_content` included (the renderer aliases reasoning
fields the way transformers does). The function is pure (the input is never mutated; the result
shares no mutable container with it) and idempotent.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

__all__ = ["normalize_messages", "template_wants_text_arguments"]

# `... + tool['function']['arguments']`, `tool_call.arguments + '...'`: arguments spliced into text
# as they are (not `+ x.arguments|tojson`, where the filter turns them into text first).
_ARGUMENTS = r"""(?:\.arguments\b|\[\s*['"]arguments['"]\s*\])"""
_TEXT_ARGUMENTS = re.compile(
    rf"""\+\s*[\w.\[\]'"]*{_ARGUMENTS}(?!\s*\|)|{_ARGUMENTS}\s*\+"""
)


def template_wants_text_arguments(template: str) -> bool:
    """True when the template concatenates tool-call `arguments` with text (so they must be a str)."""
    return _TEXT_ARGUMENTS.search(template) is not None


def json_or(text: str, accept: Callable[[Any], bool], fallback: Any) -> Any:
    """`text` decoded from JSON when it is valid JSON and `accept` takes the value; else `fallback`."""
    try:
        decoded = json.loads(text)
    except ValueError:
        return fallback
    return decoded if accept(decoded) else fallback


def _decode_arguments(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        return json_or(arguments, lambda decoded: isinstance(decoded, dict), arguments)
    return arguments


def _encode_arguments(arguments: Any) -> Any:
    if arguments is None:
        return "{}"
    if isinstance(arguments, dict):
        try:
            return json.dumps(arguments, ensure_ascii=False)
        except (TypeError, ValueError):
            return arguments
    return arguments


def _fix_tool_call(call: Any, fix_arguments) -> Any:
    if not isinstance(call, dict):
        return copy.deepcopy(call)
    fixed = {}
    for key, value in call.items():
        if key == "function" and isinstance(value, dict):
            function = {}
            for fkey, fvalue in value.items():
                function[fkey] = fix_arguments(fvalue) if fkey == "arguments" else copy.deepcopy(fvalue)
            fixed[key] = function
        elif key == "arguments":  # the flat {"name": ..., "arguments": ...} form
            fixed[key] = fix_arguments(value)
        else:
            fixed[key] = copy.deepcopy(value)
    return fixed


def normalize_messages(messages: list[dict], template: str | None = None) -> list[dict]:
    """A repaired copy of `messages` (see the module docstring); `template` is the chat template's
    source, when known, to choose the form of tool-call arguments (dict, or text for templates that
    splice them into text)."""
    fix_arguments = (_encode_arguments if template is not None and template_wants_text_arguments(template)
                     else _decode_arguments)
    out = []
    for message in messages:
        if not isinstance(message, dict):
            out.append(copy.deepcopy(message))
            continue
        fixed = {}
        for key, value in message.items():
            if key == "tool_calls":
                if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
                    continue
                if isinstance(value, (list, tuple)):
                    fixed[key] = [_fix_tool_call(call, fix_arguments) for call in value]
                    continue
            fixed[key] = copy.deepcopy(value)
        if fixed.get("role") == "assistant" and "content" in fixed and fixed["content"] is None:
            fixed["content"] = ""
        out.append(fixed)
    return out
