"""Assistant-token masks for any chat template, not only the few with `{% generation %}`.

transformers can mask assistant tokens only when the template marks them with
`{% generation %}`; almost none do (Qwen2.5, Llama-3, Mistral, ... all give an all-zero mask).
Here the spans come from the family's own description of its format instead:

1. render the whole conversation once (so templates that rewrite earlier turns when later ones are
   added, e.g. Qwen3 dropping old reasoning or Mistral v0.3 moving the system prompt, are masked
   as they are actually rendered, not as an incremental render would show them);
2. walk the rendered text: each assistant message's span starts right after the next
   assistant header (minus what the generation prompt pre-fills, which the model never writes)
   and ends after the end-of-turn string that closes it; a message whose content is not inside
   that span was dropped by the template and gets no span;
3. map character spans to tokens with the real tokenizer's offsets: a token is masked when it
   overlaps a span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignloop.chat.families import Family, detect_family, get_family
from alignloop.chat.normalize import normalize_messages
from alignloop.chat.render import ChatTemplate


@dataclass
class MaskedConversation:
    text: str
    input_ids: list[int]
    mask: list[int]  # 1 on assistant tokens (content, reasoning, tool calls, end-of-turn)
    spans: list[tuple[int, int]]  # character spans of assistant turns in `text`
    dropped: list[int]  # indices of assistant messages the template did not render

    def masked_text(self) -> str:
        return "".join(self.text[s:e] for s, e in self.spans)


def _text_of(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: only text parts can be anchors
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _find_first(text: str, needles: Sequence[str], start: int) -> tuple[int, str] | None:
    hits = [(text.find(n, start), n) for n in needles if n]
    hits = [(at, n) for at, n in hits if at >= 0]
    return min(hits) if hits else None


def assistant_spans(text: str, messages: Sequence[dict], family: Family) -> tuple[list[tuple[int, int]], list[int]]:
    """Character spans of each rendered assistant turn in `text` (and the indices of dropped turns)."""
    spans: list[tuple[int, int]] = []
    dropped: list[int] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        anchor = _text_of(message).strip()
        found = None
        probe = cursor
        # The next header normally opens this turn; if this message's text is not inside that
        # turn, the template skipped the message (or merged it), so try the following header.
        while (header := _find_first(text, family.assistant_headers, probe)) is not None:
            probe = header[0] + len(header[1])
            start = probe
            if family.generation_prefill and text.startswith(family.generation_prefill, start):
                start += len(family.generation_prefill)
            # The turn closes at the first end-of-turn after the message's text (reasoning or
            # tool calls may come before or after it, and harmony ends its reasoning with an
            # end-of-turn string of its own).
            at = text.find(anchor, start) if anchor else -1
            if anchor and at < 0:
                break  # its text is nowhere further on: the template dropped this message
            after = at + len(anchor) if at >= 0 else start
            close = _find_first(text, family.end_of_turn, after)
            end = close[0] + len(close[1]) if close else len(text)  # continue_final_message: open turn
            # A template that writes no end-of-turn after this turn (Command-R's tool_use after a
            # tool call) ends it where the next non-assistant turn begins.
            end = min(end, _next_other_turn(text, after, family))
            if at >= 0 and _crosses_other_turn(text, start, at, family):
                continue  # the text found belongs to a later turn: this message was not rendered here
            if not anchor or at >= 0:
                found = (start, end)
                break
        if found is None:
            dropped.append(index)
            continue
        spans.append(found)
        cursor = found[1]
    return spans, dropped


def _next_other_turn(text: str, start: int, family: Family) -> int:
    """Where the next non-assistant turn begins at or after start (len(text) if none does)."""
    at = start
    while (hit := _find_first(text, family.turn_starts, at)) is not None:
        if not any(text.startswith(h, hit[0]) for h in family.assistant_headers):
            return hit[0]
        at = hit[0] + len(hit[1])
    return len(text)


def _crosses_other_turn(text: str, start: int, stop: int, family: Family) -> bool:
    """Does a non-assistant turn begin between start and stop?"""
    return _next_other_turn(text, start, family) < stop


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose character range overlaps a span (offsets and spans both sorted)."""
    mask = [0] * len(offsets)
    j = 0
    for i, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and b > a and a < spans[j][1] and b > spans[j][0]:
            mask[i] = 1
    return mask


def mask_conversation(
    tokenizer: Any,
    messages: Sequence[dict],
    *,
    template: str | None = None,
    family: Family | str | None = None,
    tools: list[dict] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **template_kwargs: Any,
) -> MaskedConversation:
    """Render `messages` with the tokenizer's (or the given) template, tokenize, and mask assistant tokens.

    The family is detected from the template unless given. Raises ValueError when it cannot be.
    """
    if template is None:
        chat = ChatTemplate.from_tokenizer(tokenizer)
    else:
        chat = ChatTemplate(template,
                            bos_token=bos_token if bos_token is not None else getattr(tokenizer, "bos_token", None),
                            eos_token=eos_token if eos_token is not None else getattr(tokenizer, "eos_token", None))
    source = template if template is not None else tokenizer.chat_template
    fam = get_family(family) if family is not None else detect_family(source if isinstance(source, str) else "")
    if fam is None:
        raise ValueError("cannot tell which chat family this template belongs to; pass family=...")
    clean = normalize_messages(list(messages), template=source if isinstance(source, str) else None)
    text = chat.render(clean, tools=tools, **template_kwargs)
    spans, dropped = assistant_spans(text, clean, fam)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return MaskedConversation(text, list(encoded["input_ids"]), token_mask(encoded["offset_mapping"], spans),
                              spans, dropped)
