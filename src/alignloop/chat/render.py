"""Render Hugging Face Jinja chat templates exactly as transformers' `apply_chat_template(tokenize=False)`.

What a template sees, and how it runs, follows transformers 5.x (see shared/research/chat_templates.md
sections 2-3); the conformance corpus in shared/conformance/chat_templates/ pins it byte for byte:

- An immutable Jinja sandbox with `trim_blocks`, `lstrip_blocks`, `loopcontrols` and a
  `{% generation %}...{% endgeneration %}` tag whose character spans `render_with_spans` reports.
- `tojson` is `json.dumps` (no HTML escaping, no key sorting, `indent`/`separators` accepted);
  `raise_exception(msg)` raises `TemplateError(msg)`; `strftime_now(fmt)` reads the clock (or `now=`);
  `dict` and `namespace` are restricted versions (no underscore names on a namespace).
- Messages: keys whose value is None are dropped, every value is reduced to plain JSON data (any
  other object becomes the string "<TypeName>"), and reasoning given as `reasoning_content`,
  `thinking` or `reasoning` is visible as both `thinking` and `reasoning_content`.
- Variables: `messages`, `tools`, `documents`, `add_generation_prompt` (always defined), the special
  tokens (`bos_token`, `eos_token`, ...) and any extra keyword, which overrides a special token.
- `continue_final_message` (True, or the name of the field to continue) appends a sentinel to the
  final message, renders, and cuts the text at the sentinel.

Speed: rendering sits on the data-building hot path, so compiled templates are cached by source,
input that is already plain JSON is passed through without copying (the sandbox forbids templates
from mutating it), and the sandbox's attribute/call checks, whose answers depend only on the
object's type and the attribute's name, are memoised. None of this changes what a template sees.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.utils
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers.utils.chat_template_utils import get_json_schema

__all__ = ["ChatTemplate", "TemplateError", "render", "CONTINUE_TAG"]

#: What `continue_final_message` appends to the final message before rendering, then cuts at.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class TemplateError(jinja2.exceptions.TemplateError):
    """Raised by a template's own `raise_exception(message)`; `str(err)` is the template's message.

    It subclasses jinja2's TemplateError, as the error transformers raises there does, so code that
    catches jinja2 errors keeps working. Jinja's other errors (UndefinedError, TypeError from an
    operation on the data, TemplateSyntaxError, ...) are not wrapped: they surface unchanged.
    """


# --------------------------------------------------------------------------------------------
# Plain template data
# --------------------------------------------------------------------------------------------

_NoneType = type(None)
_SCALARS = frozenset({str, int, float, bool, _NoneType})


def _is_plain(value: Any) -> bool:
    """True when `value` is already made of exact JSON types (so it can be shown as it is)."""
    tp = type(value)
    if tp is dict:
        for key in value:
            if type(key) is not str and not _is_plain(key):
                return False
        items = value.values()
    elif tp is list or tp is tuple:
        items = value
    else:
        return tp in _SCALARS
    for item in items:
        tp = type(item)
        if tp is str or tp is int or tp is bool or tp is float or item is None:
            continue
        if (tp is dict or tp is list or tp is tuple) and _is_plain(item):
            continue
        return False
    return True


def _to_plain(value: Any) -> Any:
    """A fresh copy of `value` made of JSON types; objects of any other kind become "<TypeName>"."""
    tp = type(value)
    if tp in _SCALARS:
        return value
    if isinstance(value, str):  # str subclasses (str enums, ...): keep the text, drop the type
        return str.__str__(value)
    if isinstance(value, int):  # bool is final, so this is an int subclass (IntEnum, ...)
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_to_plain(key): _to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_to_plain(item) for item in value)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return _to_plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. OpenAI SDK messages)
        return _to_plain(value.model_dump())
    return f"<{tp.__name__}>"


def _plain(value: Any) -> Any:
    """`value` itself when it is already plain, else a plain copy."""
    return value if _is_plain(value) else _to_plain(value)


def _prepare_messages(messages: Any, fresh_last: bool) -> list[dict]:
    """What the template sees as `messages`: dicts without None values, plain data, reasoning aliased.

    Clean dicts (plain values, no None, no reasoning field) are reused as they are, and so are the
    plain values of the others: the sandbox stops templates from mutating them. `fresh_last`
    forces a private deep copy of the final message, which `continue_final_message` then edits.
    """
    messages = getattr(messages, "messages", messages)  # conversation objects
    out = []
    last = len(messages) - 1 if fresh_last else -1
    for index, message in enumerate(messages):
        if type(message) is dict and index != last:
            for key, item in message.items():
                if type(key) is not str or (type(item) is not str and (item is None or not _is_plain(item))):
                    break
            else:
                if "reasoning_content" not in message and "thinking" not in message and "reasoning" not in message:
                    out.append(message)
                    continue
            message = {
                (key if type(key) is str else _to_plain(key)): (item if type(item) is str else _plain(item))
                for key, item in message.items()
                if item is not None
            }
        else:
            converted = _to_plain(message)  # always a fresh copy
            if not isinstance(converted, dict):
                raise TypeError(f"a chat message must be a dict (or a dataclass / pydantic model), got {message!r}")
            message = {key: item for key, item in converted.items() if item is not None}
        for key in _REASONING_KEYS:
            reasoning = message.get(key)
            if reasoning is not None:
                # `thinking` goes first and keeps a value of its own; `reasoning_content` is set last.
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
                break
        out.append(message)
    return out


def _prepare_tools(tools: Any) -> Any:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if isinstance(tool, dict):
            schemas.append(tool)
        elif isinstance(tool, (types.FunctionType, types.MethodType)):
            # Type hints + a Google-style docstring -> JSON schema, the way transformers reads them.
            schemas.append(get_json_schema(tool))
        else:
            raise ValueError("each tool must be a JSON-schema dict or a function with type hints and a docstring")
    return _plain(schemas)


def _prepare_documents(documents: Any) -> Any:
    if documents is None:
        return None
    for document in documents:
        if not isinstance(document, dict):
            raise TypeError("documents must be a list of dicts (with 'title' and 'text' keys)")
    return _plain(documents)


# --------------------------------------------------------------------------------------------
# The Jinja environment
# --------------------------------------------------------------------------------------------


class _SpanTracker:
    __slots__ = ("pos", "spans")

    def __init__(self) -> None:
        self.pos = 0
        self.spans: list[tuple[int, int]] = []


_TRACKER: ContextVar[_SpanTracker | None] = ContextVar("alignloop_generation_spans", default=None)


class GenerationExtension(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body unchanged and, while a render is
    tracked, records the body's [start, end) character span in the output."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Any) -> str:
        text = caller()
        tracker = _TRACKER.get()
        if tracker is not None:
            # Everything before this block has been yielded (and counted) already.
            tracker.spans.append((tracker.pos, tracker.pos + len(text)))
        return text


def _raise_exception(message: Any) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=64)
def _encoder(ensure_ascii: bool, indent: Any, separators: Any, sort_keys: bool, _types: tuple) -> json.JSONEncoder:
    # What json.dumps builds for these arguments, kept instead of rebuilt on every call (`_types`
    # keeps 4 and 4.0, or 1 and True, apart).
    return json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Transformers' `tojson`: json.dumps without HTML escaping or key sorting."""
    try:
        encoder = _encoder(ensure_ascii, indent, separators, sort_keys,
                           (type(ensure_ascii), type(indent), type(sort_keys)))
    except TypeError:  # unhashable arguments (a list of separators): build one for this call
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)
    return encoder.encode(value)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Clock:
    """`strftime_now` bound to a fixed instant (`now=`), for reproducible renders."""

    __slots__ = ("now",)

    def __init__(self, now: datetime) -> None:
        self.now = now

    def strftime_now(self, fmt: str) -> str:
        return self.now.strftime(fmt)


class _Dict:
    """`dict(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a template namespace cannot hold an attribute starting with '_' ({name!r})")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - `self` may also be a kwarg name
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


_DICT_ATTRS = frozenset(dir(dict))
# Callables the sandbox has nothing to check or inject for: builtin methods (str.strip, dict.items,
# ...) and the template's own macros.
_DIRECT_TYPES = frozenset({types.BuiltinMethodType, jinja2.runtime.Macro})
_STOP_ITERATION_MSG = "value was undefined because a callable raised a StopIteration exception"


class _Sandbox(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with fast paths that give the same answers.

    The sandbox decides whether `obj.attr` is safe from type(obj) and the name alone, so the
    decision is memoised per (type, name). A plain dict's keys are read directly unless the name is
    one of dict's own attributes (which Jinja prefers over keys). Builtin methods (str.strip,
    dict.items, ...), macros and our own globals are called directly: the sandbox and Jinja's
    Context.call would find nothing to refuse or inject for them.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._safe_attr: dict[tuple[type, str], bool] = {}
        self._direct_calls: frozenset[int] = frozenset()

    def getattr(self, obj: Any, attribute: str) -> Any:
        tp = type(obj)
        if tp is dict and attribute not in _DICT_ATTRS:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        if attribute == "format" or attribute == "format_map":
            return super().getattr(obj, attribute)  # str.format is wrapped by the sandbox
        try:
            value = getattr(obj, attribute)
        except AttributeError:
            try:
                return obj[attribute]
            except (TypeError, LookupError):
                pass
            return self.undefined(obj=obj, name=attribute)
        key = (tp, attribute)
        safe = self._safe_attr.get(key)
        if safe is None:
            safe = self._safe_attr[key] = self.is_safe_attribute(obj, attribute, value)
        if safe:
            return value
        return self.unsafe_undefined(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(obj) is dict:
            try:
                return obj[argument]
            except KeyError:
                if type(argument) is str and argument not in _DICT_ATTRS:
                    return self.undefined(obj=obj, name=argument)
            except TypeError:
                pass
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if type(__obj) in _DIRECT_TYPES or id(__obj) in __self._direct_calls:
            if kwargs:
                kwargs.pop("_loop_vars", None)
                kwargs.pop("_block_vars", None)
            try:
                return __obj(*args, **kwargs)
            except StopIteration:
                return __context.environment.undefined(_STOP_ITERATION_MSG)
        return super().call(__context, __obj, *args, **kwargs)


def _make_environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationExtension, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    # Callables of ours (and the sandbox's `range`) that take no context and are safe to call.
    direct = (_raise_exception, _strftime_now, env.globals["range"], env.globals["dict"], _Namespace)
    env._direct_calls = frozenset(id(f) for f in direct)
    return env


_ENV = _make_environment()


class _Compiled:
    """A compiled template plus what a render needs from it, computed once."""

    __slots__ = ("source", "template", "globals", "render_func", "blocks", "name")

    def __init__(self, source: str) -> None:
        self.source = source
        self.template = _ENV.from_string(source)
        self.globals = dict(self.template.globals)  # flattened once (it is a ChainMap)
        self.render_func = self.template.root_render_func
        self.blocks = self.template.blocks
        self.name = self.template.name


@lru_cache(maxsize=512)
def compile_template(source: str) -> _Compiled:
    """The compiled form of a template source (cached by source)."""
    if not isinstance(source, str):
        raise TypeError(f"a chat template source must be a str, got {type(source).__name__}")
    return _Compiled(source)


def _run(compiled: _Compiled, variables: dict, tracker: _SpanTracker | None) -> str:
    ctx = _ENV.context_class(_ENV, variables, compiled.name, compiled.blocks, globals=compiled.globals)
    try:
        if tracker is None:
            return "".join(compiled.render_func(ctx))
        parts = []
        token = _TRACKER.set(tracker)
        try:
            for piece in compiled.render_func(ctx):
                parts.append(piece)
                tracker.pos += len(piece)
        finally:
            _TRACKER.reset(token)
        return "".join(parts)
    except Exception:
        _ENV.handle_exception()  # re-raises with the template's line in the traceback
        raise  # not reached


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class ChatTemplate:
    """One chat template (or a dict of named ones, as a tokenizer may carry) with its special tokens.

    `render()` returns exactly what transformers' `apply_chat_template(..., tokenize=False)` returns
    for the same template, special tokens and arguments.
    """

    def __init__(self, source: str | Mapping[str, str], bos_token: str | None = None,
                 eos_token: str | None = None, special_tokens: dict[str, str] | None = None) -> None:
        specials: dict[str, Any] = {}
        if special_tokens:
            specials.update({k: v for k, v in special_tokens.items() if v is not None})
        if bos_token is not None:
            specials["bos_token"] = bos_token
        if eos_token is not None:
            specials["eos_token"] = eos_token
        self.special_tokens = _plain(specials)
        if isinstance(source, Mapping):
            self.named = {name: compile_template(text) for name, text in source.items()}
            self._compiled = None
        else:
            self.named = None
            self._compiled = compile_template(source)
        self._base: dict[int, dict] = {}
        if self._compiled is not None:
            self._base_single = self._variables(self._compiled)

    @property
    def source(self) -> str | dict[str, str]:
        if self._compiled is not None:
            return self._compiled.source
        return {name: c.source for name, c in self.named.items()}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, name: str | None = None) -> ChatTemplate:
        """The tokenizer's `chat_template` with its special tokens (`special_tokens_map`)."""
        source = getattr(tokenizer, "chat_template", None)
        if source is None:
            raise ValueError("this tokenizer has no chat_template")
        if name is not None:
            if not isinstance(source, Mapping) or name not in source:
                raise ValueError(f"this tokenizer has no chat template named {name!r}")
            source = source[name]
        return cls(source, special_tokens=dict(getattr(tokenizer, "special_tokens_map", None) or {}))

    # ---- rendering ----------------------------------------------------------------------

    def _select(self, tools: Any) -> _Compiled:
        if self._compiled is not None:
            return self._compiled
        # A tokenizer's named templates: "tool_use" when tools are given, else "default".
        if tools is not None and "tool_use" in self.named:
            return self.named["tool_use"]
        if "default" in self.named:
            return self.named["default"]
        raise ValueError(f"no template to use among {sorted(self.named)} (expected 'default' or 'tool_use')")

    def _variables(self, compiled: _Compiled) -> dict:
        base = self._base.get(id(compiled))
        if base is None:
            base = self._base[id(compiled)] = {**compiled.globals, **self.special_tokens}
        return base

    def _render(self, messages: Any, tools: Any, documents: Any, add_generation_prompt: bool,
                continue_final_message: bool | str, now: datetime | None, kwargs: dict,
                tracker: _SpanTracker | None) -> str:
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot be combined: one "
                                 "continues the final message, the other opens a new assistant turn")
            if tracker is not None:
                raise ValueError("continue_final_message cannot be combined with generation spans")
        compiled = self._compiled
        if compiled is None:
            compiled = self._select(tools)
            variables = self._variables(compiled).copy()
        else:
            variables = self._base_single.copy()
        chat = _prepare_messages(messages, bool(continue_final_message))
        if now is not None:
            variables["strftime_now"] = _Clock(now).strftime_now
        if kwargs:
            variables.update(kwargs if _is_plain(kwargs) else _to_plain(kwargs))
        variables["messages"] = chat
        variables["tools"] = None if tools is None else _prepare_tools(tools)
        variables["documents"] = None if documents is None else _prepare_documents(documents)
        variables["add_generation_prompt"] = add_generation_prompt
        if not continue_final_message:
            return _run(compiled, variables, tracker)
        final = _tag_final_message(chat, continue_final_message, compiled.source)
        return _cut_at_tag(_run(compiled, variables, None), final)

    def render(self, messages: Any, *, tools: list | None = None, documents: list | None = None,
               add_generation_prompt: bool = False, continue_final_message: bool | str = False,
               now: datetime | None = None, **kwargs: Any) -> str:
        """The rendered conversation, as `apply_chat_template(..., tokenize=False)` returns it.

        `now` fixes what `strftime_now` sees (default: the local clock); extra keywords become
        template variables (overriding special tokens of the same name)."""
        return self._render(messages, tools, documents, add_generation_prompt, continue_final_message, now,
                            kwargs, None)

    def render_with_spans(self, messages: Any, *, tools: list | None = None, documents: list | None = None,
                          add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                          now: datetime | None = None, **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the [start, end) character spans of its `{% generation %}` blocks
        (empty when the template has none)."""
        tracker = _SpanTracker()
        text = self._render(messages, tools, documents, add_generation_prompt, continue_final_message, now,
                            kwargs, tracker)
        return text, tracker.spans

    @property
    def has_generation_blocks(self) -> bool:
        sources = [self._compiled.source] if self._compiled is not None else [c.source for c in self.named.values()]
        return any(_mentions_generation(s) for s in sources)

    def __repr__(self) -> str:
        if self._compiled is not None:
            return f"ChatTemplate(<{len(self._compiled.source)} chars>)"
        return f"ChatTemplate(named={sorted(self.named)})"


_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _mentions_generation(source: str) -> bool:
    return _GENERATION_TAG.search(source) is not None


def _tag_final_message(chat: list[dict], field: bool | str, source: str) -> str:
    """Append CONTINUE_TAG to the field being continued (in place: the final message is a private
    copy). Returns the original text, which must survive rendering."""
    if not chat:
        raise ValueError("continue_final_message needs a conversation with at least one message")
    name = field if isinstance(field, str) else "content"
    last = chat[-1]
    final = last.get(name)
    if final is None:
        raise ValueError(f"continue_final_message: the final message has no {name!r} to continue")
    names = [name]
    if name in _REASONING_KEYS:  # reasoning is visible under several names: tag every copy
        names = [key for key in _REASONING_KEYS if last.get(key) == final]
    if not any(key in source for key in names):
        raise ValueError(f"continue_final_message: the chat template never reads {name!r}, so it cannot be continued")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                original = block["text"]
                block["text"] = original + CONTINUE_TAG
                return original
        raise ValueError("continue_final_message: the final message has no text block to continue")
    for key in names:
        last[key] = last[key] + CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    marker = CONTINUE_TAG.strip()
    if final.strip() not in text or marker not in text:
        raise ValueError(
            "continue_final_message: the final message is not in the rendered text (the template removed "
            f"part of it), so it cannot be continued.\nFinal message: {final.strip()}\nRendered:\n{text}"
        )
    at = text.rindex(marker)
    if text.startswith(CONTINUE_TAG, at):
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message, and the space after the tag with it


@lru_cache(maxsize=512)
def _template_for(source: str, bos_token: str | None, eos_token: str | None) -> ChatTemplate:
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)


def render(template_source: str, messages: Any, *, bos_token: str | None = None, eos_token: str | None = None,
           tools: list | None = None, documents: list | None = None, add_generation_prompt: bool = False,
           continue_final_message: bool | str = False, now: datetime | None = None, **kwargs: Any) -> str:
    """Render `messages` with a template source (compiled once and cached) and these special tokens."""
    return _template_for(template_source, bos_token, eos_token)._render(
        messages, tools, documents, add_generation_prompt, continue_final_message, now, kwargs, None)
