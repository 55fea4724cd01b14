"""What alignloop knows about each chat format ("family"), independent of any one template file.

A :class:`Family` records the facts that rendering-adjacent code needs and that a template does not
state in one place: which string opens an assistant turn, which strings close it, how reasoning and
tool calls look in *generated* text, and which parts of a final assistant message survive the
family's template (see :attr:`Family.round_trip`).

Families are recognised from the template source by a :class:`Fingerprint` (substrings and regexes of
the Jinja text), never from a model name. ``detect_family`` returns the best match or ``None``.

Everything here is plain frozen data, so the registry can be shared freely between threads and
processes. The facts were established by reading the official templates of each family and by
rendering them with the HF semantics (transformers' ``apply_chat_template``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "FAMILIES",
    "ALIASES",
    "Family",
    "Fingerprint",
    "Reasoning",
    "ToolCallSyntax",
    "detect_family",
    "detect_family_of_tokenizer",
    "family_names",
    "get_family",
    "matching_families",
]


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """Conditions on a template's source text that identify a family.

    The template matches when it contains every string of ``all_of``, at least one string of
    ``any_of`` (when that is non-empty), none of ``none_of``, and every regex of ``patterns``
    is found somewhere in it (``re.search``; ``absent_patterns`` must not be found).
    """

    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    absent_patterns: tuple[str, ...] = ()

    def matches(self, source: str) -> bool:
        if not all(s in source for s in self.all_of):
            return False
        if self.any_of and not any(s in source for s in self.any_of):
            return False
        if any(s in source for s in self.none_of):
            return False
        if not all(re.search(p, source) for p in self.patterns):
            return False
        return not any(re.search(p, source) for p in self.absent_patterns)

    @property
    def weight(self) -> int:
        """How specific the fingerprint is: the number of positive conditions it checks."""
        return len(self.all_of) + (1 if self.any_of else 0) + len(self.patterns)


@dataclass(frozen=True)
class Reasoning:
    """How a family marks the model's reasoning ("thinking") in generated text.

    ``forced_open``: the family's default generation prompt already ends with ``open``, so the
    generated text starts inside the reasoning and lacks the opening tag (pass the pre-filled part
    as ``prefix`` to the parser).
    ``template_field``: the message field the template reads reasoning from (``"reasoning_content"``
    for Qwen3, ``"thinking"`` for gpt-oss), or ``None`` when it only sees reasoning inlined in
    ``content``.
    ``final_turn``: what the template does with the reasoning of the *final* assistant turn:
    ``"field"`` (rendered from ``template_field``), ``"inline"`` (content is rendered verbatim, so
    reasoning written into it as ``open…close`` survives) or ``"dropped"`` (the template strips
    everything up to ``close``).
    ``answer_tags``: optional tags wrapping the answer after the reasoning (Granite's
    ``<response>…</response>``); the parser unwraps them.
    ``switch``: name of the template kwarg that turns thinking on/off, if any.
    """

    open: str = "<think>"
    close: str = "</think>"
    forced_open: bool = False
    template_field: str | None = None
    final_turn: str = "inline"
    answer_tags: tuple[str, str] | None = None
    switch: str | None = None


@dataclass(frozen=True)
class ToolCallSyntax:
    """How tool calls appear in the text a model of this family generates.

    ``style`` selects the parser: ``hermes`` (``<tool_call>{json}</tool_call>`` blocks),
    ``mistral-json`` (``[TOOL_CALLS]`` + JSON list), ``mistral-v11`` (``[TOOL_CALLS]name[CALL_ID]id[ARGS]{json}``),
    ``llama3-json`` (bare ``{"name":…, "parameters":…}``, optionally after ``<|python_tag|>``),
    ``deepseek`` (``<｜tool▁calls▁begin｜>`` … fenced ```` ```json ```` per call), ``deepseek-v3.1``
    (``<｜tool▁call▁begin｜>name<｜tool▁sep｜>{json}``), ``harmony`` (a ``to=functions.name`` message
    on the commentary channel), ``cohere-action`` (``Action:`` + fenced JSON list of
    ``tool_name``/``parameters``), ``json-list`` (a start marker followed by a JSON list of
    ``{"name", "arguments"}`` objects: Granite's ``<|tool_call|>``, Phi-4-mini's ``functools``).

    ``start``/``end``: the markers that open and close the tool-call region (or one call); empty
    when the style has none. ``arguments_key``: the key holding the arguments in JSON styles.
    ``example``: one call for ``get_weather(city="Paris")`` as the model would write it.
    ``carries_ids``: the syntax includes call ids (Mistral; the templates require 9 characters,
    ``id_length``). ``max_calls``: the most calls the family's template can render in one message.
    ``template_arguments``: how the template wants ``function.arguments``: ``"object"`` (a dict it
    serialises with ``tojson``) or ``"string"`` (DeepSeek templates concatenate it, so it must already
    be a JSON string). ``rendered``: whether the template renders an assistant message's
    ``tool_calls`` at all. ``content_kept``: whether text content next to tool calls survives rendering.
    """

    style: str
    start: str = ""
    end: str = ""
    arguments_key: str = "arguments"
    example: str = ""
    carries_ids: bool = False
    id_length: int | None = None
    max_calls: int | None = None
    template_arguments: str = "object"
    rendered: bool = True
    content_kept: bool = True


@dataclass(frozen=True)
class Family:
    """One chat format.

    ``assistant_headers``: the text that immediately precedes the assistant's own text in a rendered
    conversation; the first one is what ``add_generation_prompt=True`` ends with (for templates
    without a generation-prompt branch it is the end of the user turn, e.g. ``[/INST]``).
    ``generation_prefill``: what the default generation prompt writes after that header on the
    model's behalf (``"<think>\\n"`` for QwQ); the model's text continues from there.
    ``end_of_turn``: strings that close an assistant turn (the first is the one the template writes
    after a plain answer). ``turn_starts``: strings that open any turn; text generated past one is
    not part of the assistant message. ``stop_strings`` combines both with the eos token.
    ``special_tokens``: the format's control strings (never legitimate content).
    ``system``: ``"native"``, ``"folded"`` (merged into a user turn), ``"ignored"`` (silently dropped) or
    ``"unsupported"`` (the template raises).
    ``supports_tools``: the template renders tool definitions; ``requires_tools``: it crashes without.
    ``prefix_stable``: rendering a conversation and then extending it only appends text, and the
    generation prompt is a prefix of the finished assistant turn.
    ``content_trimmed``: the template strips whitespace around assistant content.
    """

    name: str
    description: str
    fingerprint: Fingerprint
    assistant_headers: tuple[str, ...]
    end_of_turn: tuple[str, ...]
    turn_starts: tuple[str, ...]
    bos_token: str | None
    eos_token: str | None
    special_tokens: tuple[str, ...]
    generation_prefill: str = ""
    reasoning: Reasoning | None = None
    tool_calls: ToolCallSyntax | None = None
    system: str = "native"
    supports_tools: bool = False
    requires_tools: bool = False
    prefix_stable: bool = True
    content_trimmed: bool = False
    variant_of: str | None = None
    aliases: tuple[str, ...] = ()
    notes: str = ""
    priority: int = 0

    # ---- derived facts ---------------------------------------------------------------------------

    @property
    def supports_system(self) -> bool:
        return self.system in ("native", "folded")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Strings at which generation for this family should stop (end-of-turn first, then eos)."""
        out: list[str] = []
        for s in (*self.end_of_turn, self.eos_token):
            if s and s not in out:
                out.append(s)
        return tuple(out)

    @property
    def markers(self) -> tuple[str, ...]:
        """Every control string a streaming parser must never split or show as content."""
        found: set[str] = set(self.special_tokens) | set(self.end_of_turn) | set(self.turn_starts)
        if self.eos_token:
            found.add(self.eos_token)
        if self.reasoning:
            found |= {self.reasoning.open, self.reasoning.close}
            if self.reasoning.answer_tags:
                found |= set(self.reasoning.answer_tags)
        if self.tool_calls:
            found |= {s for s in (self.tool_calls.start, self.tool_calls.end) if s}
        found.discard("")
        return tuple(sorted(found, key=lambda s: (-len(s), s)))

    @property
    def round_trip(self) -> frozenset[str]:
        """Parts of a final assistant message that survive render → parse with this family's template.

        Members: ``"content"``, ``"reasoning"``, ``"tool_calls"``, ``"content_with_tool_calls"``,
        ``"tool_call_ids"``, ``"multiple_tool_calls"``.
        """
        parts = {"content"}
        if self.reasoning and self.reasoning.final_turn in ("field", "inline"):
            parts.add("reasoning")
        tc = self.tool_calls
        if tc and tc.rendered:
            parts.add("tool_calls")
            if tc.content_kept:
                parts.add("content_with_tool_calls")
            if tc.carries_ids:
                parts.add("tool_call_ids")
            if tc.max_calls is None or tc.max_calls > 1:
                parts.add("multiple_tool_calls")
        return frozenset(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for ``alignloop`` reports and docs)."""
        out = asdict(self)
        out["stop_strings"] = list(self.stop_strings)
        out["round_trip"] = sorted(self.round_trip)
        return out


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

_IM = ("<|im_start|>", "<|im_end|>")
_HERMES_TOOLS = ToolCallSyntax(
    style="hermes",
    start="<tool_call>",
    end="</tool_call>",
    example='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
)
_DS_SPECIALS = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
)
_DS_TURN_STARTS = ("<｜User｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁output▁begin｜>")
_DS_FENCED = ToolCallSyntax(
    style="deepseek",
    start="<｜tool▁calls▁begin｜>",
    end="<｜tool▁calls▁end｜>",
    example=(
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ),
    template_arguments="string",
)
# Command-A (and later Cohere) formats use their own action/response tokens: a different family.
_COMMAND_A = ("<|START_ACTION|>", "<|START_RESPONSE|>", "<|START_THINKING|>")
_MISTRAL_SPECIALS = (
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


def _families() -> list[Family]:
    fams: list[Family] = []
    add = fams.append

    # ---------------------------------------------------------------- Llama
    add(
        Family(
            name="llama-2",
            description="Llama-2-chat: [INST] … [/INST] turns, system folded into the first turn as <<SYS>>.",
            fingerprint=Fingerprint(all_of=("[INST]", "[/INST]", "<<SYS>>")),
            assistant_headers=("[/INST]",),
            end_of_turn=("</s>",),
            turn_starts=("[INST]", "<s>"),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=("<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
            system="folded",
            content_trimmed=True,
            notes="No generation-prompt branch: the prompt simply ends with ' [/INST]'. Strict user/assistant "
            "alternation; bos before every [INST]; assistant content is stripped and followed by ' </s>'.",
        )
    )
    add(
        Family(
            name="llama-3",
            description="Llama 3.1 / 3.2 / 3.3 Instruct: <|start_header_id|>role<|end_header_id|> headers, <|eot_id|> ends a turn.",
            fingerprint=Fingerprint(all_of=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
            assistant_headers=("<|start_header_id|>assistant<|end_header_id|>\n\n",),
            end_of_turn=("<|eot_id|>", "<|eom_id|>"),
            turn_starts=("<|start_header_id|>",),
            bos_token="<|begin_of_text|>",
            eos_token="<|eot_id|>",
            special_tokens=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ),
            tool_calls=ToolCallSyntax(
                style="llama3-json",
                start="<|python_tag|>",
                arguments_key="parameters",
                example='{"name": "get_weather", "parameters": {"city": "Paris"}}',
                max_calls=1,
                content_kept=False,
            ),
            supports_tools=True,
            content_trimmed=True,
            aliases=("llama-3.1", "llama-3.2", "llama-3.3"),
            notes="Always writes a system header with the knowledge/today date. Tool calls are a bare JSON object "
            "(optionally after <|python_tag|>, ending in <|eom_id|> in ipython mode); the template renders exactly one "
            "call and drops the message content next to it. The base tokenizer's eos is <|end_of_text|>, but a chat "
            "turn ends with <|eot_id|>.",
        )
    )

    # ---------------------------------------------------------------- Mistral
    add(
        Family(
            name="mistral-v0.1",
            description="Mistral-7B-Instruct v0.1/v0.2 (v1 tokenizer): '[INST] q [/INST]' then the answer and '</s> '.",
            fingerprint=Fingerprint(
                all_of=("[INST]", "[/INST]"),
                none_of=("<<SYS>>", "[TOOL_CALLS]", "[SYSTEM_PROMPT]", "[AVAILABLE_TOOLS]"),
            ),
            assistant_headers=("[/INST]",),
            end_of_turn=("</s>",),
            turn_starts=("[INST]",),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=("<s>", "</s>", "[INST]", "[/INST]"),
            system="unsupported",
            notes="No system role (the template raises), no tools, no generation-prompt branch; each answer is followed "
            "by '</s> '.",
        )
    )
    add(
        Family(
            name="mistral-v0.3",
            description="Mistral-7B-Instruct v0.3 (v3 SentencePiece tokenizer) with [AVAILABLE_TOOLS] and [TOOL_CALLS] JSON lists.",
            fingerprint=Fingerprint(all_of=("[INST]", "[/INST]"), patterns=(r"\[TOOL_CALLS\] \[",), none_of=("[SYSTEM_PROMPT]",)),
            assistant_headers=("[/INST]",),
            end_of_turn=("</s>",),
            turn_starts=("[INST]", "[TOOL_RESULTS]", "[AVAILABLE_TOOLS]"),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=_MISTRAL_SPECIALS,
            tool_calls=ToolCallSyntax(
                style="mistral-json",
                start="[TOOL_CALLS]",
                example='[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
                carries_ids=True,
                id_length=9,
                content_kept=False,
            ),
            system="folded",
            supports_tools=True,
            prefix_stable=False,
            content_trimmed=True,
            notes="The system prompt is prepended to the LAST user turn, so it moves (and vanishes once the conversation "
            "ends with an assistant turn): not prefix-stable. Tool call ids must be 9 characters. Content next to tool "
            "calls is not rendered.",
        )
    )
    add(
        Family(
            name="mistral-nemo",
            description="Mistral-Nemo-Instruct-2407 (v3 tekken tokenizer): like v0.3 without the spaces around markers.",
            fingerprint=Fingerprint(
                all_of=("[INST]", "[/INST]"), patterns=(r"\[TOOL_CALLS\]\[",), none_of=("[SYSTEM_PROMPT]", "[ARGS]")
            ),
            assistant_headers=("[/INST]",),
            end_of_turn=("</s>",),
            turn_starts=("[INST]", "[TOOL_RESULTS]", "[AVAILABLE_TOOLS]"),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=_MISTRAL_SPECIALS,
            tool_calls=ToolCallSyntax(
                style="mistral-json",
                start="[TOOL_CALLS]",
                example='[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]',
                carries_ids=True,
                id_length=9,
                content_kept=False,
            ),
            system="folded",
            supports_tools=True,
            prefix_stable=False,
            variant_of="mistral-v0.3",
            aliases=("mistral-tekken",),
            notes="Same placement rules as mistral-v0.3 (system before the last user turn); content is not trimmed.",
        )
    )
    add(
        Family(
            name="mistral-small-3.2",
            description="Mistral-Small-3.2 (v7 tekken): [SYSTEM_PROMPT] block, calls as [TOOL_CALLS]name[CALL_ID]id[ARGS]{json}.",
            fingerprint=Fingerprint(all_of=("[INST]", "[SYSTEM_PROMPT]", "[TOOL_CALLS]", "[ARGS]")),
            assistant_headers=("[/INST]",),
            end_of_turn=("</s>",),
            turn_starts=("[INST]", "[TOOL_RESULTS]", "[AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]"),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=(
                *_MISTRAL_SPECIALS,
                "[SYSTEM_PROMPT]",
                "[/SYSTEM_PROMPT]",
                "[CALL_ID]",
                "[ARGS]",
                "[TOOL_CONTENT]",
                "[IMG]",
            ),
            tool_calls=ToolCallSyntax(
                style="mistral-v11",
                start="[TOOL_CALLS]",
                example='[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}',
                carries_ids=True,
                id_length=9,
                content_kept=False,
            ),
            supports_tools=True,
            aliases=("mistral-v7",),
            notes="Writes a long default system prompt (with today's date) when none is given. No generation-prompt "
            "branch. Content next to tool calls is not rendered.",
        )
    )

    # ---------------------------------------------------------------- Qwen / ChatML
    add(
        Family(
            name="qwen2.5",
            description="Qwen2.5-Instruct: ChatML with Hermes-style <tools>/<tool_call>/<tool_response>.",
            fingerprint=Fingerprint(
                all_of=(*_IM, "<tool_call>", "<tool_response>"), none_of=("<think>", "FunctionCall", "<|im_sep|>")
            ),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token=None,
            eos_token="<|im_end|>",
            special_tokens=(*_IM, "<|endoftext|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
            tool_calls=_HERMES_TOOLS,
            supports_tools=True,
            notes="Default system prompt 'You are Qwen, created by Alibaba Cloud…' when none is given. Dict arguments "
            "are rendered with tojson (string arguments would be double-encoded).",
        )
    )
    add(
        Family(
            name="qwen3",
            description="Qwen3 (hybrid thinking): ChatML, <think> blocks from reasoning_content, Hermes tool calls.",
            fingerprint=Fingerprint(all_of=(*_IM, "<think>", "reasoning_content"), none_of=("<|im_sep|>",)),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token=None,
            eos_token="<|im_end|>",
            special_tokens=(
                *_IM,
                "<|endoftext|>",
                "<think>",
                "</think>",
                "<tool_call>",
                "</tool_call>",
                "<tool_response>",
                "</tool_response>",
            ),
            reasoning=Reasoning(template_field="reasoning_content", final_turn="field", switch="enable_thinking"),
            tool_calls=_HERMES_TOOLS,
            supports_tools=True,
            prefix_stable=False,
            notes="The final assistant turn (after the last user query) always gets a <think> block, empty when there "
            "is no reasoning; earlier turns lose theirs, so the template is not prefix-stable across turns. "
            "enable_thinking=False pre-fills '<think>\\n\\n</think>\\n\\n'. Reasoning is stripped of surrounding "
            "newlines and content of leading newlines.",
        )
    )
    add(
        Family(
            name="qwq",
            description="QwQ-32B: ChatML whose generation prompt forces '<think>\\n'; reasoning stripped from history.",
            fingerprint=Fingerprint(
                all_of=(*_IM, "<think>", "<tool_call>"), none_of=("reasoning_content", "enable_thinking", "/no_think")
            ),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token=None,
            eos_token="<|im_end|>",
            special_tokens=(
                *_IM,
                "<|endoftext|>",
                "<think>",
                "</think>",
                "<tool_call>",
                "</tool_call>",
                "<tool_response>",
                "</tool_response>",
            ),
            generation_prefill="<think>\n",
            reasoning=Reasoning(forced_open=True, final_turn="inline"),
            tool_calls=_HERMES_TOOLS,
            supports_tools=True,
            prefix_stable=False,
            aliases=("qwq-32b",),
            notes="The generation prompt ends with '<think>\\n', so generated text lacks the opening tag (parse with "
            "prefix='<think>\\n'). The final assistant content is rendered verbatim (reasoning survives only when "
            "inlined as '<think>…</think>' in content); earlier turns keep only the text after '</think>'.",
        )
    )
    add(
        Family(
            name="hermes-3",
            description="Hermes-2-Pro / Hermes-3 tool_use template: ChatML, <tools> with a FunctionCall schema, <tool_call> blocks.",
            fingerprint=Fingerprint(all_of=(*_IM, "<tool_call>"), any_of=("FunctionCall", "json_to_python_type")),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token="<|begin_of_text|>",
            eos_token="<|im_end|>",
            special_tokens=(*_IM, "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"),
            tool_calls=ToolCallSyntax(
                style="hermes",
                start="<tool_call>",
                end="</tool_call>",
                example=_HERMES_TOOLS.example,
                content_kept=False,
            ),
            supports_tools=True,
            requires_tools=True,
            notes="The tool_use template iterates over `tools` unconditionally and crashes without them. An assistant "
            "message with tool_calls is rendered without its content.",
        )
    )
    add(
        Family(
            name="smollm3",
            description="SmolLM3: ChatML with a metadata system block, /think and /no_think reasoning modes.",
            fingerprint=Fingerprint(all_of=(*_IM, "/no_think", "<think>")),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token=None,
            eos_token="<|im_end|>",
            special_tokens=(*_IM, "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>"),
            reasoning=Reasoning(final_turn="inline", switch="enable_thinking"),
            tool_calls=ToolCallSyntax(
                style="hermes",
                start="<tool_call>",
                end="</tool_call>",
                example=_HERMES_TOOLS.example,
                rendered=False,
            ),
            supports_tools=True,
            notes="enable_thinking=False (or '/no_think' in the system prompt) pre-fills '<think>\\n\\n</think>\\n'. "
            "Assistant content is rendered verbatim (leading newlines stripped), so inlined reasoning survives; "
            "tool_calls of assistant messages are not rendered. Has {% generation %} blocks.",
        )
    )
    add(
        Family(
            name="smollm2",
            description="SmolLM2-Instruct: plain ChatML with a default 'SmolLM' system prompt.",
            fingerprint=Fingerprint(all_of=(*_IM, "SmolLM"), none_of=("<think>", "<tool_call>", "/no_think")),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            special_tokens=(*_IM, "<|endoftext|>"),
            variant_of="chatml",
            notes="ChatML; adds 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' when the "
            "conversation has no system message. The tokenizer's bos token is <|im_start|> itself.",
        )
    )
    add(
        Family(
            name="chatml",
            description="Generic ChatML (<|im_start|>role\\n … <|im_end|>), e.g. OpenHermes, vLLM's example template.",
            fingerprint=Fingerprint(
                all_of=_IM,
                none_of=("<tool_call>", "<think>", "<|im_sep|>", "SmolLM", "FunctionCall", "<tools>", "/no_think"),
            ),
            assistant_headers=("<|im_start|>assistant\n",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token=None,
            eos_token="<|im_end|>",
            special_tokens=_IM,
            priority=-1,
            notes="Some variants (vLLM's example) omit the final <|im_end|> when add_generation_prompt is false.",
        )
    )

    # ---------------------------------------------------------------- DeepSeek
    add(
        Family(
            name="deepseek-v3",
            description="DeepSeek-V3: <｜User｜>/<｜Assistant｜> markers, fenced-JSON tool calls inside <｜tool▁calls▁begin｜>.",
            fingerprint=Fingerprint(all_of=("<｜User｜>", "<｜Assistant｜>"), none_of=("<think>", "</think>")),
            assistant_headers=("<｜Assistant｜>",),
            end_of_turn=("<｜end▁of▁sentence｜>",),
            turn_starts=_DS_TURN_STARTS,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            special_tokens=_DS_SPECIALS,
            tool_calls=ToolCallSyntax(
                style="deepseek",
                start=_DS_FENCED.start,
                end=_DS_FENCED.end,
                example=_DS_FENCED.example,
                template_arguments="string",
                rendered=False,
            ),
            notes="Tool calls are only rendered when content is None, but HF drops None-valued keys before rendering, "
            "so with transformers' semantics an assistant tool-call message renders as an empty answer. Arguments "
            "must be a JSON string (the template concatenates them). No tool definitions are rendered.",
        )
    )
    add(
        Family(
            name="deepseek-r1",
            description="DeepSeek-R1 (Jan-2025 template): V3 markers; the model opens its own <think>; history drops reasoning.",
            fingerprint=Fingerprint(
                all_of=("<｜User｜>", "<｜Assistant｜>", "```json", "</think>"),
                none_of=("is_last_user", "<｜Assistant｜><think>"),
            ),
            assistant_headers=("<｜Assistant｜>",),
            end_of_turn=("<｜end▁of▁sentence｜>",),
            turn_starts=_DS_TURN_STARTS,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            special_tokens=(*_DS_SPECIALS, "<think>", "</think>"),
            reasoning=Reasoning(final_turn="dropped"),
            tool_calls=_DS_FENCED,
            notes="Every assistant turn (the final one too) keeps only the text after '</think>', so reasoning never "
            "survives rendering. Tool calls render (content may precede them) with arguments as a JSON string. Later "
            "R1 revisions pre-fill '<think>\\n' like deepseek-r1-distill-qwen (the parser accepts text that starts "
            "inside the reasoning).",
        )
    )
    add(
        Family(
            name="deepseek-r1-0528",
            description="DeepSeek-R1-0528: the user turn itself ends with <｜Assistant｜>; tool calls as in R1.",
            fingerprint=Fingerprint(all_of=("<｜User｜>", "<｜Assistant｜>", "```json", "is_last_user")),
            assistant_headers=("<｜Assistant｜>",),
            end_of_turn=("<｜end▁of▁sentence｜>",),
            turn_starts=_DS_TURN_STARTS,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            special_tokens=(*_DS_SPECIALS, "<think>", "</think>"),
            reasoning=Reasoning(final_turn="dropped"),
            tool_calls=_DS_FENCED,
            variant_of="deepseek-r1",
            notes="add_generation_prompt adds nothing after a user turn (the turn already ends with <｜Assistant｜>). "
            "Reasoning is dropped from every assistant turn; tool calls render with content before them.",
        )
    )
    add(
        Family(
            name="deepseek-r1-distill-qwen",
            description="DeepSeek-R1-Distill-Qwen (and later R1 revisions): generation prompt forces '<think>\\n'.",
            fingerprint=Fingerprint(all_of=("<｜User｜>", "<｜Assistant｜><think>", "```json"), none_of=("is_last_user",)),
            assistant_headers=("<｜Assistant｜>",),
            end_of_turn=("<｜end▁of▁sentence｜>",),
            turn_starts=_DS_TURN_STARTS,
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            special_tokens=(*_DS_SPECIALS, "<think>", "</think>"),
            generation_prefill="<think>\n",
            reasoning=Reasoning(forced_open=True, final_turn="dropped"),
            tool_calls=ToolCallSyntax(
                style="deepseek",
                start=_DS_FENCED.start,
                end=_DS_FENCED.end,
                example=_DS_FENCED.example,
                template_arguments="string",
                rendered=False,
            ),
            prefix_stable=False,
            variant_of="deepseek-r1",
            notes="The generation prompt ends with '<think>\\n' but a rendered assistant turn does not contain it, so "
            "the prompt is not a prefix of the finished turn. Reasoning is dropped from every turn; tool calls are "
            "rendered only for content=None, which HF's None-dropping prevents (like deepseek-v3).",
        )
    )
    add(
        Family(
            name="deepseek-v3.1",
            description="DeepSeek-V3.1 hybrid: '<｜Assistant｜></think>' (non-thinking) or '<think>' prompt; calls as name<｜tool▁sep｜>{json}.",
            fingerprint=Fingerprint(all_of=("<｜User｜>", "<｜Assistant｜>", "</think>", "<｜tool▁sep｜>"), none_of=("```json",)),
            assistant_headers=("<｜Assistant｜>",),
            end_of_turn=("<｜end▁of▁sentence｜>",),
            turn_starts=("<｜User｜>", "<｜tool▁output▁begin｜>"),
            bos_token="<｜begin▁of▁sentence｜>",
            eos_token="<｜end▁of▁sentence｜>",
            special_tokens=(*_DS_SPECIALS, "<think>", "</think>"),
            generation_prefill="</think>",
            reasoning=Reasoning(final_turn="dropped", switch="thinking"),
            tool_calls=ToolCallSyntax(
                style="deepseek-v3.1",
                start="<｜tool▁calls▁begin｜>",
                end="<｜tool▁calls▁end｜>",
                example='<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
                template_arguments="string",
            ),
            variant_of="deepseek-r1",
            notes="Default (thinking=False) generation prompt pre-fills '</think>' (parse with prefix='</think>'); "
            "thinking=True pre-fills '<think>'. Rendered assistant turns keep only the text after '</think>'. Tool "
            "calls render with content before them, arguments as a JSON string.",
        )
    )

    # ---------------------------------------------------------------- Gemma
    add(
        Family(
            name="gemma-2",
            description="Gemma / Gemma-2: <start_of_turn>user|model … <end_of_turn>, no system role.",
            fingerprint=Fingerprint(
                all_of=("<start_of_turn>", "<end_of_turn>"), none_of=("<start_of_image>", "first_user_prefix")
            ),
            assistant_headers=("<start_of_turn>model\n",),
            end_of_turn=("<end_of_turn>",),
            turn_starts=("<start_of_turn>",),
            bos_token="<bos>",
            eos_token="<eos>",
            special_tokens=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
            system="unsupported",
            content_trimmed=True,
            notes="The template raises 'System role not supported'; strict alternation; content trimmed.",
        )
    )
    add(
        Family(
            name="gemma-3",
            description="Gemma-3: Gemma-2 turns; the system message is folded into the first user turn.",
            fingerprint=Fingerprint(all_of=("<start_of_turn>", "<end_of_turn>"), any_of=("<start_of_image>", "first_user_prefix")),
            assistant_headers=("<start_of_turn>model\n",),
            end_of_turn=("<end_of_turn>",),
            turn_starts=("<start_of_turn>",),
            bos_token="<bos>",
            eos_token="<eos>",
            special_tokens=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
            system="folded",
            content_trimmed=True,
            notes="System text is prepended to the first user turn followed by a blank line; content trimmed.",
        )
    )

    # ---------------------------------------------------------------- Phi
    add(
        Family(
            name="phi-3",
            description="Phi-3 / Phi-3.5-mini: <|user|>\\n … <|end|>\\n, <|assistant|>\\n.",
            fingerprint=Fingerprint(all_of=("<|user|>", "<|assistant|>", "<|end|>"), none_of=("<|/tool|>",)),
            assistant_headers=("<|assistant|>\n",),
            end_of_turn=("<|end|>", "<|endoftext|>"),
            turn_starts=("<|user|>", "<|system|>", "<|assistant|>"),
            bos_token="<s>",
            eos_token="<|endoftext|>",
            special_tokens=("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            prefix_stable=False,
            aliases=("phi-3.5",),
            notes="Without add_generation_prompt the template appends eos after the last turn, so a rendered "
            "conversation is not a prefix of its extension. Phi-3.5 skips an empty system message.",
        )
    )
    add(
        Family(
            name="phi-4",
            description="Phi-4 (14B): <|im_start|>role<|im_sep|> … <|im_end|>; every user turn opens the assistant turn.",
            fingerprint=Fingerprint(all_of=("<|im_start|>", "<|im_sep|>", "<|im_end|>"), none_of=("<think>",)),
            assistant_headers=("<|im_start|>assistant<|im_sep|>",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token="<|endoftext|>",
            eos_token="<|im_end|>",
            special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>"),
            notes="No generation-prompt branch: each user turn is followed by '<|im_start|>assistant<|im_sep|>'.",
        )
    )
    add(
        Family(
            name="phi-4-mini",
            description="Phi-4-mini-instruct: <|role|>content<|end|> with tools inside the system message; calls as functools[...].",
            fingerprint=Fingerprint(all_of=("<|end|>", "<|tool|>", "<|/tool|>")),
            assistant_headers=("<|assistant|>",),
            end_of_turn=("<|end|>", "<|endoftext|>"),
            turn_starts=("<|user|>", "<|system|>", "<|assistant|>", "<|tool|>"),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            special_tokens=("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
            tool_calls=ToolCallSyntax(
                style="json-list",
                start="functools",
                example='functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
                rendered=False,
            ),
            supports_tools=True,
            prefix_stable=False,
            variant_of="phi-4",
            notes="Tools are passed as a JSON string in the system message's 'tools' key, not via tools=. Assistant "
            "tool_calls are not rendered. Appends eos when add_generation_prompt is false (not prefix-stable).",
        )
    )
    add(
        Family(
            name="phi-4-reasoning",
            description="Phi-4-reasoning: Phi-4 turns, a fixed reasoning system prompt, <think>…</think> then the solution.",
            fingerprint=Fingerprint(all_of=("<|im_start|>", "<|im_sep|>", "<think>")),
            assistant_headers=("<|im_start|>assistant<|im_sep|>",),
            end_of_turn=("<|im_end|>",),
            turn_starts=("<|im_start|>",),
            bos_token="<|endoftext|>",
            eos_token="<|im_end|>",
            special_tokens=("<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"),
            reasoning=Reasoning(final_turn="inline"),
            system="ignored",
            variant_of="phi-4",
            notes="The system prompt is hard-coded; system messages are silently ignored. Content (with inlined "
            "reasoning) is rendered verbatim. Has {% generation %} blocks.",
        )
    )

    # ---------------------------------------------------------------- gpt-oss
    add(
        Family(
            name="gpt-oss",
            description="OpenAI gpt-oss (harmony): <|start|>role<|channel|>analysis|commentary|final<|message|>…",
            fingerprint=Fingerprint(all_of=("<|start|>", "<|channel|>", "<|message|>")),
            assistant_headers=("<|start|>assistant",),
            end_of_turn=("<|return|>", "<|call|>", "<|end|>"),
            turn_starts=("<|start|>user", "<|start|>system", "<|start|>developer", "<|start|>functions"),
            bos_token="<|startoftext|>",
            eos_token="<|return|>",
            special_tokens=(
                "<|startoftext|>",
                "<|start|>",
                "<|channel|>",
                "<|message|>",
                "<|constrain|>",
                "<|end|>",
                "<|return|>",
                "<|call|>",
            ),
            reasoning=Reasoning(open="<|channel|>analysis<|message|>", close="<|end|>", template_field="thinking", final_turn="field"),
            tool_calls=ToolCallSyntax(
                style="harmony",
                start=" to=functions.",
                end="<|call|>",
                example='<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
                max_calls=1,
                content_kept=False,
            ),
            supports_tools=True,
            prefix_stable=False,
            aliases=("harmony",),
            notes="A turn is a sequence of messages: analysis (reasoning), commentary (preambles and calls, "
            "'to=functions.NAME'), final (the answer, ending with <|return|>; <|end|> in history). The final turn "
            "renders reasoning from 'thinking' only when add_generation_prompt is false; earlier turns drop it. "
            "A tool-call message renders at most one call, and its content (or thinking; both raise) as an analysis "
            "message, so content next to a call comes back as reasoning_content.",
        )
    )

    # ---------------------------------------------------------------- others
    add(
        Family(
            name="zephyr",
            description="Zephyr (and TinyLlama-chat): <|user|>\\n…</s> with eos closing every turn.",
            fingerprint=Fingerprint(
                all_of=("<|user|>", "<|assistant|>", "eos_token"),
                none_of=("<|end|>", "<|tool|>", "[gMASK]", "<sop>", "<|observation|>", "<tool_call>"),
            ),
            assistant_headers=("<|assistant|>\n",),
            end_of_turn=("</s>",),
            turn_starts=("<|user|>", "<|system|>", "<|assistant|>"),
            bos_token="<s>",
            eos_token="</s>",
            special_tokens=("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"),
            notes="Every turn is closed by eos followed by a newline.",
        )
    )
    add(
        Family(
            name="command-r",
            description="Cohere Command-R default template: <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|> … <|END_OF_TURN_TOKEN|>.",
            fingerprint=Fingerprint(
                all_of=("<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
                none_of=("Action:", *_COMMAND_A),
            ),
            assistant_headers=("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",),
            end_of_turn=("<|END_OF_TURN_TOKEN|>",),
            turn_starts=("<|START_OF_TURN_TOKEN|>",),
            bos_token="<BOS_TOKEN>",
            eos_token="<|END_OF_TURN_TOKEN|>",
            special_tokens=(
                "<BOS_TOKEN>",
                "<|START_OF_TURN_TOKEN|>",
                "<|END_OF_TURN_TOKEN|>",
                "<|SYSTEM_TOKEN|>",
                "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>",
            ),
            tool_calls=ToolCallSyntax(
                style="cohere-action",
                start="Action:",
                arguments_key="parameters",
                example='Action: ```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {"city": "Paris"}\n    }\n]\n```',
                rendered=False,
            ),
            content_trimmed=True,
            notes="The default template has no tool support; the tool_use variant is 'command-r-tool-use'.",
        )
    )
    add(
        Family(
            name="command-r-tool-use",
            description="Cohere Command-R / R+ tool_use template: tool preamble, calls as 'Action:' + fenced JSON list.",
            fingerprint=Fingerprint(
                all_of=("<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "Action:", "tool_name"), none_of=_COMMAND_A
            ),
            assistant_headers=("<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",),
            end_of_turn=("<|END_OF_TURN_TOKEN|>",),
            turn_starts=("<|START_OF_TURN_TOKEN|>",),
            bos_token="<BOS_TOKEN>",
            eos_token="<|END_OF_TURN_TOKEN|>",
            special_tokens=(
                "<BOS_TOKEN>",
                "<|START_OF_TURN_TOKEN|>",
                "<|END_OF_TURN_TOKEN|>",
                "<|SYSTEM_TOKEN|>",
                "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>",
            ),
            tool_calls=ToolCallSyntax(
                style="cohere-action",
                start="Action:",
                arguments_key="parameters",
                example='Action: ```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {"city": "Paris"}\n    }\n]\n```',
            ),
            supports_tools=True,
            requires_tools=True,
            prefix_stable=False,
            content_trimmed=True,
            variant_of="command-r",
            aliases=("command-r-plus-tool-use",),
            notes="An instruction system turn is written after the whole conversation, so the generation prompt is not "
            "a prefix of a finished assistant turn. A tool-call turn ends with the closing fence, without "
            "<|END_OF_TURN_TOKEN|>. The model may call the pseudo-tool 'directly-answer'. Arguments are re-indented with "
            "Jinja's `indent`, which breaks JSON strings containing U+2028/U+2029/U+0085 (lossy).",
        )
    )
    add(
        Family(
            name="granite-3.3",
            description="IBM Granite 3.x: <|start_of_role|>role<|end_of_role|> … <|end_of_text|>; calls as <|tool_call|>[...].",
            fingerprint=Fingerprint(all_of=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>")),
            assistant_headers=("<|start_of_role|>assistant<|end_of_role|>",),
            end_of_turn=("<|end_of_text|>",),
            turn_starts=("<|start_of_role|>",),
            bos_token="<|end_of_text|>",
            eos_token="<|end_of_text|>",
            special_tokens=(
                "<|start_of_role|>",
                "<|end_of_role|>",
                "<|end_of_text|>",
                "<|tool_call|>",
                "<|start_of_cite|>",
                "<|end_of_cite|>",
            ),
            reasoning=Reasoning(final_turn="inline", answer_tags=("<response>", "</response>"), switch="thinking"),
            tool_calls=ToolCallSyntax(
                style="json-list",
                start="<|tool_call|>",
                example='<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
                rendered=False,
            ),
            supports_tools=True,
            aliases=("granite",),
            notes="Default system prompt carries today's date. thinking=True asks for '<think>…</think>"
            "<response>…</response>'. Assistant tool_calls are not rendered (content only). Also supports documents.",
        )
    )
    return fams


FAMILIES: dict[str, Family] = {f.name: f for f in _families()}

ALIASES: dict[str, str] = {alias: f.name for f in FAMILIES.values() for alias in f.aliases}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str | Family) -> Family:
    """Look a family up by name or alias (case-insensitive); raise ``KeyError`` listing the known names."""
    if isinstance(name, Family):
        return name
    key = str(name).strip().lower()
    if key in FAMILIES:
        return FAMILIES[key]
    if key in ALIASES:
        return FAMILIES[ALIASES[key]]
    known = ", ".join(family_names())
    aliases = ", ".join(sorted(ALIASES))
    raise KeyError(f"unknown chat family {name!r}; known families: {known} (aliases: {aliases})")


def matching_families(template_source: str) -> list[Family]:
    """All families whose fingerprint matches, best first (priority, then specificity)."""
    hits = [f for f in FAMILIES.values() if f.fingerprint.matches(template_source)]
    return sorted(hits, key=lambda f: (-f.priority, -f.fingerprint.weight, f.name))


def detect_family(template_source: str) -> Family | None:
    """The family of a chat template, recognised from its source text alone (``None`` if unknown)."""
    if not isinstance(template_source, str) or not template_source:
        return None
    hits = matching_families(template_source)
    return hits[0] if hits else None


# Special tokens that betray a format when a tokenizer ships no chat template at all.
_TOKEN_HINTS: tuple[tuple[str, str], ...] = (
    ("<|channel|>", "gpt-oss"),
    ("<|start_header_id|>", "llama-3"),
    ("<|start_of_role|>", "granite-3.3"),
    ("<|START_OF_TURN_TOKEN|>", "command-r"),
    ("<｜Assistant｜>", "deepseek-v3"),
    ("<start_of_turn>", "gemma-2"),
    ("<|im_sep|>", "phi-4"),
    ("[SYSTEM_PROMPT]", "mistral-small-3.2"),
    ("[TOOL_CALLS]", "mistral-v0.3"),
    ("[INST]", "mistral-v0.1"),
    ("<|im_start|>", "chatml"),
)


def _template_sources(chat_template: Any) -> list[str]:
    if isinstance(chat_template, str):
        return [chat_template]
    if isinstance(chat_template, dict):
        order = ["default", *[k for k in chat_template if k != "default"]]
        return [chat_template[k] for k in order if isinstance(chat_template.get(k), str)]
    if isinstance(chat_template, (list, tuple)):  # legacy [{"name": ..., "template": ...}]
        named = {d.get("name"): d.get("template") for d in chat_template if isinstance(d, dict)}
        return _template_sources(named)
    return []


def detect_family_of_tokenizer(tokenizer: Any) -> Family | None:
    """The family of a tokenizer: from its ``chat_template`` (``default`` first when it has several),
    else from the special tokens it defines. ``None`` when neither says anything."""
    for source in _template_sources(getattr(tokenizer, "chat_template", None)):
        fam = detect_family(source)
        if fam is not None:
            return fam
    tokens: set[str] = set()
    for attr in ("all_special_tokens", "additional_special_tokens"):
        try:
            tokens.update(str(t) for t in (getattr(tokenizer, attr, None) or ()))
        except Exception:  # pragma: no cover - exotic tokenizers
            pass
    try:
        added = tokenizer.get_added_vocab()
        tokens.update(added)
    except Exception:
        pass
    for token, name in _TOKEN_HINTS:
        if token in tokens:
            return FAMILIES[name]
    return None
