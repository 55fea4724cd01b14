"""Lint a chat template: find what it silently drops, moves or gets wrong, before a model is trained on it.

`lint_template(source)` renders small probe conversations whose every field carries a unique marker
string, and reports each field the template loses (or raises on) as a :class:`Finding`:

==========================  ====================================================================
kind                        fires when
==========================  ====================================================================
``system_dropped``          the system prompt is absent from a render (e.g. Mistral v0.3/Nemo once
                            the conversation ends with an assistant or tool turn), or the template
                            raises on a system message
``tools_ignored``           tool schemas passed as ``tools=`` are not rendered (or make it raise)
``tool_calls_ignored``      an assistant message's ``tool_calls`` are not rendered
``tool_results_ignored``    a ``tool`` message's content is not rendered
``reasoning_stripped``      the final assistant turn's reasoning is not rendered (warning), or only
                            earlier turns' reasoning is (info: by design for reasoning models)
``not_prefix_stable``       render(conv[:k]) is not a prefix of render(conv) for sys,u,a,u,a, or the
                            generation prompt is not a prefix of the finished assistant turn
``double_bos``              the render starts with the BOS string and the tokenizer adds a BOS of its
                            own when encoding with ``add_special_tokens=True``
``eos_not_end_of_turn``     the eos token differs from the string that ends an assistant turn, so
                            generation stops only if that string is a stop token as well
``family_mismatch``         the template's end-of-turn (or BOS) string is not a single token of the
                            tokenizer, or the tokenizer's own template belongs to another family
==========================  ====================================================================

Severity: ``error`` for silent loss of data the template claims to handle (or two BOS tokens, or
control strings the tokenizer cannot emit), ``warning`` for a feature the template lacks or handles
in a way that breaks common pipelines, ``info`` for behaviour that is by design.

The last three kinds need token facts: ``double_bos`` and the vocabulary check of ``family_mismatch``
need ``tokenizer=`` (a transformers tokenizer or a ``tokenizers.Tokenizer``); ``eos_not_end_of_turn``
uses ``eos_token`` or, failing that, the tokenizer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alignloop.chat.families import Family, detect_family, detect_family_of_tokenizer
from alignloop.chat.normalize import normalize_messages
from alignloop.chat.render import ChatTemplate

__all__ = ["KINDS", "SEVERITIES", "Finding", "encode", "lint_template", "prefix_stability", "token_string"]

KINDS = (
    "system_dropped",
    "tools_ignored",
    "tool_calls_ignored",
    "tool_results_ignored",
    "reasoning_stripped",
    "not_prefix_stable",
    "double_bos",
    "eos_not_end_of_turn",
    "family_mismatch",
)
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem of a template: its kind (see KINDS), how bad it is, and a one-line explanation."""

    kind: str
    severity: str  # "error" | "warning" | "info"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.kind}: {self.message}"


# --------------------------------------------------------------------------------------------------
# Probe conversations: every field holds a marker that appears nowhere else
# --------------------------------------------------------------------------------------------------

SYS = "Probe system prompt QZSYSTEM."
USER1 = "Probe question QZUSERONE?"
USER2 = "Probe question QZUSERTWO?"
ANSWER1 = "Probe answer QZANSWERONE."
ANSWER2 = "Probe answer QZANSWERTWO."
REASONING = "Probe reasoning QZREASONING."
TOOL_NAME = "qz_probe_tool"
TOOL_DESCRIPTION = "Probe tool QZTOOLDESC."
ARG_VALUE = "QZARGVALUE"
RESULT = "Probe result QZRESULT."
CALL_ID = "qzcall001"  # Mistral templates insist on 9-character ids

#: Fixed clock for templates that print today's date, so two renders of one lint always agree.
NOW = datetime(2024, 7, 26, 12, 0)

_OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": TOOL_DESCRIPTION,
        "parameters": {
            "type": "object",
            "properties": {"qz_arg": {"type": "string", "description": "Probe argument."}},
            "required": ["qz_arg"],
        },
    },
}
_COHERE_TOOL = {
    "name": TOOL_NAME,
    "description": TOOL_DESCRIPTION,
    "parameter_definitions": {"qz_arg": {"description": "Probe argument.", "type": "str", "required": True}},
}


def _system() -> dict:
    return {"role": "system", "content": SYS}


def _user(text: str = USER1) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str = ANSWER1, **extra: Any) -> dict:
    return {"role": "assistant", "content": text, **extra}


def _tool_call_message() -> dict:
    call = {"id": CALL_ID, "type": "function", "function": {"name": TOOL_NAME, "arguments": {"qz_arg": ARG_VALUE}}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _tool_result() -> dict:
    return {"role": "tool", "tool_call_id": CALL_ID, "name": TOOL_NAME, "content": RESULT}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Prober:
    """Renders probe conversations with one template (normalised first, at a fixed clock)."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        self.source = source
        self.chat = ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
        self.tool = _COHERE_TOOL if "parameter_definitions" in source else _OPENAI_TOOL
        self.base_tools: list | None = None
        # Templates that need tools (Hermes / Command-R tool_use) crash without: give them the probe tool.
        if self.attempt([_user()], add_generation_prompt=True)[1] is not None:
            if self.attempt([_user()], tools=[self.tool], add_generation_prompt=True)[1] is None:
                self.base_tools = [self.tool]

    def render(self, messages: list[dict], *, tools: list | None = None, add_generation_prompt: bool = False) -> str:
        clean = normalize_messages(messages, template=self.source)
        return self.chat.render(clean, tools=tools if tools is not None else self.base_tools,
                                add_generation_prompt=add_generation_prompt, now=NOW)

    def attempt(self, messages: list[dict], **kwargs: Any) -> tuple[str | None, str | None]:
        """(text, None) or (None, the error as one line)."""
        try:
            return self.render(messages, **kwargs), None
        except Exception as exc:  # a template may raise anything: TemplateError, TypeError, UndefinedError...
            return None, _one_line(exc)


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def _check_system(p: _Prober) -> list[Finding]:
    text, error = p.attempt([_system(), _user()], add_generation_prompt=True)
    if error is not None:
        return [Finding("system_dropped", "warning",
                        f"a conversation with a system message cannot be rendered ({error}); fold the system "
                        "prompt into the first user turn yourself")]
    shapes = [
        ("a user turn", text),
        ("an assistant turn", p.attempt([_system(), _user(), _assistant()])[0]),
        ("a tool result", p.attempt([_system(), _user(), _tool_call_message(), _tool_result()],
                                    tools=[p.tool], add_generation_prompt=True)[0]),
    ]
    lost = [shape for shape, rendered in shapes if rendered is not None and SYS not in rendered]
    if not lost:
        return []
    if lost[0] == "a user turn":
        return [Finding("system_dropped", "error", "the system prompt is never rendered (the template ignores "
                                                   "system messages)")]
    return [Finding("system_dropped", "error",
                    f"the system prompt disappears when the conversation ends with {' or '.join(lost)} (it is "
                    "rendered only before the last user turn), so training data loses it")]


def _mentions(source: str, *needles: str) -> bool:
    return any(n in source for n in needles)


def _check_tools(p: _Prober) -> list[Finding]:
    text, error = p.attempt([_user()], tools=[p.tool], add_generation_prompt=True)
    if error is not None:
        return [Finding("tools_ignored", "warning", f"the template raises when tools are given ({error})")]
    if TOOL_NAME in text:
        return []
    why = "it reads tool definitions from elsewhere" if _mentions(p.source, "tools") else "it never reads tools="
    return [Finding("tools_ignored", "warning",
                    f"tool schemas passed as tools= are not rendered ({why}): the model never sees them")]


def _dropped(kind: str, error: str | None, rendered: bool, raises: str, has_branch: bool, dropped: str,
             unsupported: str) -> list[Finding]:
    """The finding for one probed part of a conversation: the template raised on it (a warning), dropped it
    although it has a branch for it (an error: the branch expects another shape), or has no support (a warning)."""
    if error is not None:
        return [Finding(kind, "warning", f"the template raises on {raises} ({error})")]
    if rendered:
        return []
    if has_branch:
        return [Finding(kind, "error", dropped)]
    return [Finding(kind, "warning", unsupported)]


def _check_tool_messages(p: _Prober) -> list[Finding]:
    conv = [_user(), _tool_call_message(), _tool_result()]
    text, error = p.attempt(conv, tools=[p.tool], add_generation_prompt=True)
    call_text, call_error = (text, None) if text is not None else p.attempt(conv[:2], tools=[p.tool])
    calls = _dropped(
        "tool_calls_ignored", call_error, call_error is None and ARG_VALUE in call_text,
        "an assistant message with tool_calls", _mentions(p.source, "tool_calls"),
        "an assistant message's tool_calls are silently dropped although the template has a "
        "tool-call branch (check which message shape it expects)",
        "an assistant message's tool_calls are not rendered (the template has no tool-call "
        "support): the model is trained on an empty turn")
    results = _dropped(
        "tool_results_ignored", error, error is None and RESULT in text,
        "a conversation with a tool message", _mentions(p.source, "'tool'", '"tool"', "ipython", "tool_response"),
        "a tool message's content is silently dropped although the template has a tool-message "
        "branch: the model never sees the tool's result",
        "a tool message is silently dropped (the template has no tool role): the model never "
        "sees the tool's result")
    return calls + results


def _check_reasoning(p: _Prober, family: Family | None) -> list[Finding]:
    final, error = p.attempt([_user(), _assistant(ANSWER1, reasoning_content=REASONING)])
    if error is not None:
        return []  # a plain assistant turn that fails is reported by other checks
    reasoning_model = (family is not None and family.reasoning is not None) or _mentions(
        p.source, "reasoning_content", "thinking", "<think>")
    if REASONING not in final:
        if not reasoning_model:
            hint = " (the template has no notion of reasoning; write it inline in content to train on it)"
        elif family is not None and family.reasoning is not None and family.reasoning.final_turn == "inline":
            hint = " (it survives only when written inline in content)"
        else:
            hint = ""
        return [Finding("reasoning_stripped", "warning",
                        f"the final assistant turn's reasoning_content is not rendered{hint}: reasoning traces are "
                        "lost from training data")]
    history, _ = p.attempt([_user(), _assistant(ANSWER1, reasoning_content=REASONING), _user(USER2)],
                           add_generation_prompt=True)
    if history is not None and REASONING not in history:
        return [Finding("reasoning_stripped", "info",
                        "reasoning of earlier assistant turns is stripped (by design): mask or train only the final "
                        "turn's reasoning")]
    return []


def _prefix_conversation(with_system: bool = True) -> list[dict]:
    conv = [_user(USER1), _assistant(ANSWER1), _user(USER2), _assistant(ANSWER2)]
    return [_system(), *conv] if with_system else conv


def _stability(p: _Prober, conv: list[dict]) -> dict:
    full = p.render(conv)
    history = [k for k in range(1, len(conv)) if not full.startswith(p.render(conv[:k]))]
    prompts = [k for k in range(1, len(conv)) if conv[k]["role"] == "assistant"
               and not p.render(conv[:k + 1]).startswith(p.render(conv[:k], add_generation_prompt=True))]
    return {"history_prefix_fail_at": history, "genprompt_mismatch_at": prompts, "error": None}


def prefix_stability(source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                     with_system: bool = True) -> dict:
    """Prefix stability of a sys,u,a,u,a conversation, in the shape of corpus/prefix_stability.json.

    ``history_prefix_fail_at``: the k (1..4) for which render(conv[:k]) is not a prefix of
    render(conv); ``genprompt_mismatch_at``: the k (conv[k] an assistant turn) for which
    render(conv[:k], add_generation_prompt=True) is not a prefix of render(conv[:k+1]);
    ``error``: the template's error when the conversation cannot be rendered (both lists empty)."""
    p = _Prober(source, bos_token, eos_token)
    try:
        return _stability(p, _prefix_conversation(with_system))
    except Exception as exc:
        return {"history_prefix_fail_at": [], "genprompt_mismatch_at": [], "error": _one_line(exc)}


def _check_prefix(p: _Prober) -> list[Finding]:
    try:
        result = _stability(p, _prefix_conversation(True))
    except Exception:
        try:  # no system role: check the same conversation without one
            result = _stability(p, _prefix_conversation(False))
        except Exception:
            return []
    out = []
    if result["history_prefix_fail_at"]:
        ks = ", ".join(map(str, result["history_prefix_fail_at"]))
        out.append(Finding("not_prefix_stable", "warning",
                           f"render(conv[:k]) is not a prefix of the full render for k = {ks}: earlier turns are "
                           "re-rendered as the conversation grows (prefix-diff masks and KV-cache reuse break)"))
    if result["genprompt_mismatch_at"]:
        ks = ", ".join(map(str, result["genprompt_mismatch_at"]))
        out.append(Finding("not_prefix_stable", "warning",
                           f"the generation prompt is not a prefix of the finished assistant turn (k = {ks}): "
                           "what the model saw at sampling time differs from what it is trained on"))
    return out


# --------------------------------------------------------------------------------------------------
# Token facts
# --------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text` for a transformers tokenizer or a `tokenizers.Tokenizer`."""
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def token_string(tokenizer: Any, token_id: int) -> str:
    if hasattr(tokenizer, "id_to_token"):
        return str(tokenizer.id_to_token(token_id))
    return str(tokenizer.convert_ids_to_tokens(token_id))


def _added_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before the text when asked to add special tokens (its BOS)."""
    plain = encode(tokenizer, "hello world")
    special = encode(tokenizer, "hello world", add_special_tokens=True)
    for start in range(len(special) - len(plain) + 1):
        if special[start:start + len(plain)] == plain:
            return special[:start]
    return []


def _check_double_bos(p: _Prober, tokenizer: Any) -> list[Finding]:
    prefix = _added_prefix(tokenizer)
    if not prefix:
        return []
    text, _ = p.attempt([_user()], add_generation_prompt=True)
    if text is None or encode(tokenizer, text)[:len(prefix)] != prefix:
        return []
    bos = "".join(token_string(tokenizer, i) for i in prefix)
    return [Finding("double_bos", "error",
                    f"the render starts with {bos!r} and the tokenizer adds {bos!r} again when encoding with "
                    "add_special_tokens=True (two BOS tokens): encode rendered text with add_special_tokens=False")]


def _end_of_turn(p: _Prober, family: Family) -> str | None:
    """The end-of-turn string the template writes right after a plain assistant answer."""
    text, _ = p.attempt([_user(), _assistant()])
    if text is not None and ANSWER1 in text:
        after = text[text.rindex(ANSWER1) + len(ANSWER1):].lstrip()
        for end in family.end_of_turn:
            if after.startswith(end):
                return end
    return family.end_of_turn[0] if family.end_of_turn else None


def _check_eos(p: _Prober, family: Family | None, eos_token: str | None) -> list[Finding]:
    if family is None or not eos_token:
        return []
    end = _end_of_turn(p, family)
    if end is None or end == eos_token:
        return []
    return [Finding("eos_not_end_of_turn", "warning",
                    f"eos {eos_token!r} is not the end-of-turn {end!r} written after each assistant turn: generation "
                    f"never stops unless {end!r} is a stop token too (e.g. in generation_config.eos_token_id)")]


def _related(a: Family, b: Family) -> bool:
    return a.name == b.name or (a.variant_of or a.name) == (b.variant_of or b.name) or b.name == a.variant_of


def _check_family(p: _Prober, family: Family | None, tokenizer: Any) -> list[Finding]:
    """The strings the model must emit or see as one token (end-of-turn, BOS) must be single tokens;
    and a tokenizer that ships a chat template of another family was trained on another format."""
    if family is None:
        return []
    tok_family = detect_family_of_tokenizer(tokenizer)
    text, _ = p.attempt([_user(), _assistant(), _user(USER2), _assistant(ANSWER2)])
    controls = [end for end in family.end_of_turn if text and end in text]
    if text and family.bos_token and text.startswith(family.bos_token):
        controls.insert(0, family.bos_token)
    missing = [s for s in dict.fromkeys(controls) if len(encode(tokenizer, s)) != 1]
    if missing:
        looks = f" (the tokenizer looks like {tok_family.name})" if tok_family not in (None, family) else ""
        shown = ", ".join(repr(s) for s in missing)
        return [Finding("family_mismatch", "error",
                        f"the template is {family.name} but the tokenizer has no single token for {shown}{looks}: "
                        "the model can neither see nor stop at its turn boundaries")]
    if getattr(tokenizer, "chat_template", None) and tok_family is not None and not _related(family, tok_family):
        return [Finding("family_mismatch", "warning",
                        f"the template is {family.name} but the tokenizer's own chat template is {tok_family.name}")]
    return []


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def lint_template(source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                  tokenizer: Any = None) -> list[Finding]:
    """Every problem found in the chat template `source` (errors first, then warnings, then info).

    `bos_token`/`eos_token` are what the template sees (default: the tokenizer's, when one is given);
    `tokenizer` enables the token-level checks (double_bos, family_mismatch)."""
    if tokenizer is not None:
        bos_token = bos_token if bos_token is not None else getattr(tokenizer, "bos_token", None)
        eos_token = eos_token if eos_token is not None else getattr(tokenizer, "eos_token", None)
    p = _Prober(source, bos_token, eos_token)
    family = detect_family(source)
    checks: list[Callable[[], list[Finding]]] = [
        lambda: _check_system(p),
        lambda: _check_tools(p),
        lambda: _check_tool_messages(p),
        lambda: _check_reasoning(p, family),
        lambda: _check_prefix(p),
        lambda: _check_eos(p, family, eos_token),
    ]
    if tokenizer is not None:
        checks += [lambda: _check_double_bos(p, tokenizer), lambda: _check_family(p, family, tokenizer)]
    findings = [finding for check in checks for finding in check()]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
