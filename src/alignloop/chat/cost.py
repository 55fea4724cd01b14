"""Token economics of chat templates: how many tokens a template spends on its own scaffolding.

Overhead = tokens of the rendered text minus the tokens of the message contents (each content
tokenized on its own). `template_costs` measures it on one fixed conversation:

- ``one_turn``: overhead of a single user turn with the generation prompt (headers, BOS, default
  system prompts and date preambles included); ``tokens`` is that render's full length;
- ``per_system``: what adding a system prompt costs beyond its own text (negative when it replaces
  a longer default system prompt, as in Qwen2.5 or SmolLM2);
- ``per_exchange``: what one more user+assistant exchange costs beyond its text;
- ``per_tool``: every token that one tool schema adds to the prompt (the schema is not conversation
  content, so all of it counts).

A metric the template cannot give is None, with the reason in ``notes`` ("raises", "ignored", ...).

Tokenizers: a transformers tokenizer, a `tokenizers.Tokenizer`, or :func:`mistral_tokenizer`
(Mistral's own v1 / v3 / tekken tokenizers from the `mistral-common` package, which tokenize a
rendered text the way mistral-common tokenizes the same conversation: control strings become their
control tokens, and SentencePiece turns the space after one into the word-initial marker).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from alignloop.chat.normalize import normalize_messages
from alignloop.chat.render import ChatTemplate
from alignloop.errors import AlignloopError

__all__ = [
    "METRICS",
    "MISTRAL_TOKENIZER_OF_FAMILY",
    "MistralCommonTokenizer",
    "cost_plot",
    "cost_table",
    "count_tokens",
    "mistral_tokenizer",
    "template_costs",
]

#: The measured quantities, in table order, with their column titles.
METRICS = {
    "tokens": "1-turn tokens",
    "one_turn": "overhead: 1 turn",
    "per_system": "+ system",
    "per_exchange": "+ exchange (u+a)",
    "per_tool": "+ tool schema",
}

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
FOLLOW_UP = "And of Germany?"
NOW = datetime(2024, 7, 26, 12, 0)

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
COHERE_TOOL = {  # the same tool in Cohere's format, for templates that read `parameter_definitions`
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "parameter_definitions": {
        "city": {"description": "City name", "type": "str", "required": True},
        "unit": {"description": "celsius or fahrenheit", "type": "str", "required": False},
    },
}

#: Which of mistral-common's tokenizers belongs to which alignloop chat family.
MISTRAL_TOKENIZER_OF_FAMILY = {"mistral-v0.1": "v1", "mistral-v0.3": "v3", "mistral-nemo": "tekken"}


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


class MistralCommonTokenizer:
    """One of mistral-common's tokenizers, encoding rendered text (control strings included)."""

    def __init__(self, version: str, mistral: Any) -> None:
        self.name = f"mistral-common {version}"
        self.version = version
        self.raw = mistral.instruct_tokenizer.tokenizer
        self.sentencepiece = version != "tekken"
        specials = {self.raw.id_to_piece(i): i for i in sorted(self.raw.special_ids)}
        specials = {piece: i for piece, i in specials.items() if piece and piece not in ("<unk>", "<pad>")}
        self.specials = specials
        ordered = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in ordered) + ")")

    def encode_text(self, text: str) -> list[int]:
        """Plain text (no control strings), as mistral-common encodes a message's content."""
        return list(self.raw.encode(text, bos=False, eos=False)) if text else []

    def encode(self, text: str) -> list[int]:
        """A rendered prompt: control strings are control tokens; with SentencePiece, one space after
        a control string is the word-initial marker of the text that follows (as in mistral-common)."""
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self.specials:
                ids.append(self.specials[piece])
                continue
            if self.sentencepiece and piece.startswith(" "):
                piece = piece[1:]
            ids.extend(self.encode_text(piece))
        return ids

    def __repr__(self) -> str:
        return f"MistralCommonTokenizer({self.version!r})"


@lru_cache(maxsize=None)
def mistral_tokenizer(version: str) -> MistralCommonTokenizer:
    """Mistral's real tokenizer, shipped with `mistral-common`: "v1" (Mistral-7B v0.1/v0.2),
    "v3" (v0.3, SentencePiece) or "tekken" (Nemo)."""
    try:  # optional (the dev extra): only these comparisons need it
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        raise AlignloopError("Mistral's tokenizers need the mistral-common package: pip install mistral-common") from None
    makers = {"v1": MistralTokenizer.v1, "v3": MistralTokenizer.v3, "tekken": lambda: MistralTokenizer.v3(is_tekken=True)}
    if version not in makers:
        raise AlignloopError(f"unknown mistral-common tokenizer {version!r}: use one of {', '.join(makers)}")
    return MistralCommonTokenizer(version, makers[version]())


def _ids(tokenizer: Any, text: str, *, content: bool = False) -> list[int]:
    if isinstance(tokenizer, MistralCommonTokenizer):
        return tokenizer.encode_text(text) if content else tokenizer.encode(text)
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return list(tokenizer.encode(text, add_special_tokens=False).ids)
    # transformers: what apply_chat_template(tokenize=True) does (the render carries its own BOS)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer: Any, text: str, *, content: bool = False) -> int:
    """Tokens of `text`: a rendered prompt, or (content=True) one message's plain text."""
    return len(_ids(tokenizer, text, content=content))


# --------------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------------


def _content_tokens(tokenizer: Any, messages: list[dict]) -> int:
    return sum(count_tokens(tokenizer, m["content"], content=True) for m in messages if m.get("content"))


def template_costs(source: str, tokenizer: Any, *, bos_token: str | None, eos_token: str | None,
                   now: datetime = NOW) -> dict:
    """Template-overhead tokens of `source` with `tokenizer` (see the module docstring).

    Returns ``{"tokens", "one_turn", "per_system", "per_exchange", "per_tool": int | None, "notes": {metric: why}}``.
    """
    chat = ChatTemplate(source, bos_token=bos_token, eos_token=eos_token)
    tool = COHERE_TOOL if "parameter_definitions" in source else TOOL
    notes: dict[str, str] = {}

    def render(messages: list[dict], tools: list | None) -> str:
        return chat.render(normalize_messages(messages, template=source), tools=tools,
                           add_generation_prompt=True, now=now)

    def overhead(messages: list[dict], tools: list | None) -> tuple[int, int]:
        total = count_tokens(tokenizer, render(messages, tools))
        return total, total - _content_tokens(tokenizer, messages)

    user = [{"role": "user", "content": QUESTION}]
    base_tools = None
    try:
        tokens, one_turn = overhead(user, None)
    except Exception:
        base_tools = []  # templates that iterate `tools` unconditionally (Hermes, Command-R tool_use)
        try:
            tokens, one_turn = overhead(user, base_tools)
        except Exception as exc:
            raise AlignloopError(f"the template cannot render a single user message ({_why(exc)})") from None
    out: dict[str, Any] = {"tokens": tokens, "one_turn": one_turn}

    def delta(metric: str, messages: list[dict], tools: list | None, check: str | None = None) -> None:
        try:
            text = render(messages, tools)
        except Exception as exc:
            out[metric], notes[metric] = None, f"raises ({_why(exc)})"
            return
        if check is not None and check not in text:
            out[metric], notes[metric] = None, "ignored"
            return
        total = count_tokens(tokenizer, text)
        if metric == "per_tool":  # the whole schema counts: it is not conversation content
            out[metric] = total - tokens
        else:
            out[metric] = total - _content_tokens(tokenizer, messages) - one_turn

    delta("per_system", [{"role": "system", "content": SYSTEM}, *user], base_tools, check=SYSTEM)
    delta("per_exchange", [*user, {"role": "assistant", "content": ANSWER}, {"role": "user", "content": FOLLOW_UP}],
          base_tools, check=ANSWER)
    delta("per_tool", user, [*(base_tools or []), tool], check="get_weather")
    out["notes"] = notes
    return out


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------------


def cost_table(entries: list[dict], title: str = "chat-template token overhead"):
    """A rich Table of cost entries: `template_costs` results with "template" and "tokenizer" labels."""
    table = Table(title=title)
    table.add_column("template")
    table.add_column("tokenizer")
    for heading in METRICS.values():
        table.add_column(heading, justify="right")
    for entry in entries:
        cells = []
        for metric in METRICS:
            value = entry.get(metric)
            if value is None:
                note = entry.get("notes", {}).get(metric, "n/a")
                cells.append("raises" if note.startswith("raises") else note)
            else:
                cells.append(f"{value:+d}" if metric in ("per_system", "per_exchange") and value < 0 else str(value))
        table.add_row(Text(str(entry.get("template", "?"))), Text(str(entry.get("tokenizer", "?"))), *cells)
    return table


def cost_plot(rows: list[dict], path: str | Path, title: str = "chat-template token overhead") -> Path:
    """A grouped bar chart (PNG) of the overhead metrics of each entry; missing values are left out."""
    # matplotlib only for this plot: its import takes about a second, which no other use should pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [m for m in METRICS if m != "tokens"]
    labels = [f"{r.get('template', '?')}\n{r.get('tokenizer', '')}" for r in rows]
    width = 0.8 / len(metrics)
    fig = Figure(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, metric in enumerate(metrics):
        xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ys = [r.get(metric) for r in rows]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               label=METRICS[metric])
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
