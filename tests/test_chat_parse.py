"""Parsing generated assistant text: round trips through every real template, streaming, argument typing."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.chat.families import FAMILIES, Family, detect_family, get_family
from alignloop.chat.parse import StreamParser, coerce_arguments, parse_assistant, tool_schemas
from tool_schemas import function_tool

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
TEMPLATES = CORPUS / "templates"
needs_corpus = pytest.mark.skipif(not TEMPLATES.is_dir(), reason="chat-template conformance corpus not present")

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------------------------------
# rendering helper: the project's renderer when it exists, transformers' otherwise (same HF semantics)
# --------------------------------------------------------------------------------------------------


def _hf_input(messages: list[dict]) -> list[dict]:
    """What apply_chat_template hands a template: None-valued keys dropped, reasoning aliased."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = m.get("reasoning_content", m.get("thinking"))
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render(template: str, messages: list[dict], *, tools=None, add_generation_prompt=False, bos=None, eos=None) -> str:
    messages = _hf_input(messages)
    try:
        from alignloop.chat.render import render as project_render  # type: ignore[attr-defined]
    except ImportError:
        project_render = None
    if project_render is not None:
        return project_render(
            template, messages, tools=tools, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    out, _ = render_jinja_template(
        [messages], tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt, **tokens
    )
    return out[0]


def _templates() -> dict[str, tuple[str, Family, dict]]:
    if not TEMPLATES.is_dir():
        return {}
    index = {e["family"]: e for e in json.loads((TEMPLATES / "index.json").read_text(encoding="utf-8"))}
    out = {}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        source = path.read_text(encoding="utf-8")
        fam = detect_family(source)
        assert fam is not None, path.stem
        out[path.stem] = (source, fam, index[path.stem])
    return out


TEMPLATE_INFO = _templates()
STEMS = sorted(TEMPLATE_INFO)


# --------------------------------------------------------------------------------------------------
# tools and generated messages
# --------------------------------------------------------------------------------------------------

TOOLS = [
    function_tool(
        "get_weather",
        "Weather for a city",
        {
            "city": {"type": "string", "description": "City name"},
            "days": {"type": "integer", "description": "How many days"},
            "metric": {"type": "boolean", "description": "Metric units"},
        },
        ["city"],
    ),
    function_tool(
        "set_alarm",
        "Set an alarm",
        {
            "hour": {"type": "number", "description": "Hour of day"},
            "labels": {"type": "array", "items": {"type": "string"}, "description": "Labels"},
            "options": {
                "type": "object",
                "properties": {"repeat": {"type": "integer"}, "note": {"type": "string"}},
                "additionalProperties": {"type": "string"},
                "description": "Options",
            },
        },
        ["hour"],
    ),
    function_tool("ping", "No arguments", {}),
]

# letters, digits, punctuation incl. brackets that start control strings, unicode, newlines and tabs
_ALPHABET = st.sampled_from(string.ascii_letters + string.digits + " .,;:!?-_'\"()<>[]{}|/\\`*#@=+~\n\t") | st.sampled_from(
    "éüßñ中文日本語🙂ßΩ€\u00a0\u2028"
)


def _clean(fam: Family):
    """Text without surrounding whitespace that contains none of the family's control strings."""
    forbidden = set(fam.markers) | {"Action:", "functools", "<|python_tag|>"}
    return (
        st.text(_ALPHABET, max_size=40)
        .map(str.strip)
        .filter(lambda s: not any(m.strip() and m.strip() in s for m in forbidden))
    )


_ANY_TEXT = st.text(_ALPHABET, max_size=20)


def _arguments(name: str, text):
    if name == "get_weather":
        return st.fixed_dictionaries(
            {"city": text}, optional={"days": st.integers(-(10**6), 10**6), "metric": st.booleans()}
        )
    if name == "set_alarm":
        hour = st.floats(allow_nan=False, allow_infinity=False, width=64) | st.integers(0, 23)
        options = st.fixed_dictionaries({}, optional={"repeat": st.integers(0, 9), "note": text})
        return st.fixed_dictionaries({"hour": hour}, optional={"labels": st.lists(text, max_size=3), "options": options})
    return st.just({})


@st.composite
def _tool_call(draw, fam: Family):
    name = draw(st.sampled_from(["get_weather", "set_alarm", "ping"]))
    text = _clean(fam)
    if fam.name == "command-r-tool-use":
        # its template re-indents the JSON with `indent`, which splits strings at \u2028 & co (lossy)
        text = text.filter(lambda s: not any(ch in s for ch in "\x85\u2028\u2029"))
    args = draw(_arguments(name, text))
    call_id = draw(st.text(string.ascii_letters + string.digits, min_size=9, max_size=9))
    return {"type": "function", "id": call_id, "function": {"name": name, "arguments": args}}


@st.composite
def assistant_messages(draw, fam: Family) -> dict:
    """An OpenAI-format assistant message the family can render (content, optional reasoning and calls)."""
    calls = []
    if fam.tool_calls is not None:
        limit = fam.tool_calls.max_calls or 3
        calls = draw(st.lists(_tool_call(fam), max_size=limit))
    reasoning = draw(st.none() | _clean(fam).filter(bool)) if fam.reasoning else None
    content = draw(_clean(fam))
    if calls and (not content or draw(st.booleans())):
        content = None
    if calls and fam.tool_calls.style == "harmony" and reasoning and content:
        content = None  # gpt-oss rejects content and thinking together next to a call
    return _assistant(content, reasoning, calls)


def _assistant(content, reasoning, calls: list) -> dict:
    """An assistant message, with `reasoning_content` and `tool_calls` only where they are not empty."""
    msg: dict = {"role": "assistant", "content": content}
    if reasoning:
        msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg


def template_message(m: dict, fam: Family) -> dict:
    """The message as this family's template expects it (reasoning in a field or inlined, string arguments...)."""
    content = m.get("content")
    out: dict = {"role": "assistant"}
    reasoning = m.get("reasoning_content")
    r = fam.reasoning
    if reasoning and r is not None:
        if r.final_turn == "field":
            out["reasoning_content"] = reasoning
        elif r.final_turn == "inline":
            content = f"{r.open}\n{reasoning}\n{r.close}\n\n{content or ''}"
    if m.get("tool_calls"):
        calls = []
        for c in m["tool_calls"]:
            args = c["function"]["arguments"]
            if fam.tool_calls.template_arguments == "string":
                args = json.dumps(args, ensure_ascii=False)
            calls.append({**c, "function": {"name": c["function"]["name"], "arguments": args}})
        out["tool_calls"] = calls
    out["content"] = content if content is not None else ""
    return out


def expected_round_trip(m: dict, fam: Family) -> dict:
    """What parsing the rendered final turn gives back, by the family's documented round-trip parts."""
    parts = fam.round_trip
    content = m.get("content")
    reasoning = m.get("reasoning_content") if "reasoning" in parts else None
    calls = m.get("tool_calls") or []
    if calls and "tool_calls" in parts:
        calls = [
            {
                "type": "function",
                **({"id": c["id"]} if "tool_call_ids" in parts else {}),
                "function": c["function"],
            }
            for c in calls
        ]
        if fam.tool_calls.style == "harmony":  # content next to a call is rendered as analysis
            reasoning = reasoning or content or None
            content = None
        elif "content_with_tool_calls" not in parts:
            content = None
        content = content or None
    else:
        calls = []
        content = content or ""
    return _assistant(content, reasoning, calls)


def _conversation(fam: Family, with_system: bool) -> list[dict]:
    conv = [{"role": "user", "content": "What is the weather in Paris?"}]
    if with_system and fam.system != "unsupported":  # ("ignored" systems are rendered as nothing)
        conv.insert(0, {"role": "system", "content": "You are terse."})
    return conv


def draw_message(data, stem: str) -> tuple[Family, dict]:
    """The family of the corpus template `stem` and an assistant message drawn for it."""
    _, fam, _ = TEMPLATE_INFO[stem]
    return fam, data.draw(assistant_messages(fam), label="message")


def rendered_final_turn(stem: str, m: dict, with_system: bool = True) -> tuple[str, str]:
    """Render ``m`` as the final assistant turn and return (generated text, prefix) as a model would see it.

    For prefix-stable templates the generated text is what follows the generation prompt, and the
    prefix is what that prompt pre-filled after the assistant header. Otherwise the assistant segment
    is found after the last assistant header (the template did not pre-fill anything there).
    """
    source, fam, meta = TEMPLATE_INFO[stem]
    tools = TOOLS if fam.supports_tools else None
    conv = _conversation(fam, with_system)
    kw = dict(tools=tools, bos=meta["bos_token"], eos=meta["eos_token"])
    prompt = render(source, conv, add_generation_prompt=True, **kw)
    full = render(source, [*conv, template_message(m, fam)], **kw)
    header = fam.assistant_headers[0]
    if full.startswith(prompt):
        prefill = prompt[prompt.rindex(header) + len(header) :]
        return full[len(prompt) :], prefill
    k = full.rindex(header)
    return full[k + len(header) :], ""


# --------------------------------------------------------------------------------------------------
# round trip through the real templates
# --------------------------------------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize("stem", STEMS)
@SETTINGS
@given(data=st.data())
def test_round_trip_through_template(stem, data):
    fam, m = draw_message(data, stem)
    with_system = data.draw(st.booleans(), label="system")
    text, prefix = rendered_final_turn(stem, m, with_system)
    got = parse_assistant(text, fam, tools=TOOLS, prefix=prefix)
    assert got == expected_round_trip(m, fam), (text, prefix)


@needs_corpus
def test_every_family_is_covered_by_a_template():
    assert {fam.name for _, fam, _ in TEMPLATE_INFO.values()} == set(FAMILIES)


@needs_corpus
@pytest.mark.parametrize(
    "stem",
    ["qwen3", "qwq-32b", "deepseek-r1", "deepseek-v3.1", "gpt-oss", "mistral-7b-instruct-v0.3", "command-r-plus-tool_use"],
)
def test_round_trip_full_message(stem):
    """One hand-picked rich message per interesting family, with the result spelled out."""
    _, fam, _ = TEMPLATE_INFO[stem]
    m = {
        "role": "assistant",
        "content": "Checking.",
        "reasoning_content": "Need weather.",
        "tool_calls": [
            {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
        ],
    }
    if fam.name == "gpt-oss":
        m["content"] = None
    text, prefix = rendered_final_turn(stem, m)
    got = parse_assistant(text, fam, tools=TOOLS, prefix=prefix)
    assert got == expected_round_trip(m, fam)
    assert got["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}


# --------------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------------


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def _check_stream(fam: Family, text: str, prefix: str, pieces: list[str], tools=TOOLS) -> None:
    final = parse_assistant(text, fam, tools=tools, prefix=prefix)
    sp = StreamParser(fam, tools=tools, prefix=prefix)
    markers = [m for m in fam.markers if m.strip()]
    for piece in pieces:
        cur = sp.feed(piece)
        assert cur["role"] == "assistant"
        for key in ("content", "reasoning_content"):
            value = cur.get(key) or ""
            target = final.get(key) or ""
            assert target.startswith(value), (key, value, target)
            if not any(mk in target for mk in markers):  # (a malformed call stays in content, markers and all)
                assert not any(mk in value for mk in markers), value
        calls = cur.get("tool_calls", [])
        assert calls == final.get("tool_calls", [])[: len(calls)]
    assert sp.finish() == final
    assert sp.text == text


@needs_corpus
@pytest.mark.parametrize("stem", STEMS)
@SETTINGS
@given(data=st.data())
def test_streaming_matches_and_never_leaks(stem, data):
    fam, m = draw_message(data, stem)
    text, prefix = rendered_final_turn(stem, m)
    cuts = data.draw(st.lists(st.integers(0, max(len(text), 1)), max_size=12), label="cuts")
    _check_stream(fam, text, prefix, _chunks(text, cuts))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_streaming_char_by_char_hides_partial_tags(name):
    """Fed one character at a time, an answer closed by each end-of-turn string never shows a piece of it."""
    fam = get_family(name)
    answer = "Sure: 1 < 2 and [x]."
    for eot in fam.end_of_turn:
        text = answer + eot + "\n"
        _check_stream(fam, text, "", list(text))
        assert parse_assistant(text, fam)["content"] == answer


def test_stream_example_qwen3():
    fam = get_family("qwen3")
    text = '<think>\nplan\n</think>\n\nOn it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": "3"}}\n</tool_call><|im_end|>'
    seen = []
    sp = StreamParser(fam, tools=TOOLS)
    for i in range(0, len(text), 3):
        seen.append(sp.feed(text[i : i + 3]))
    final = sp.finish()
    assert final == {
        "role": "assistant",
        "content": "On it.",
        "reasoning_content": "plan",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}}],
    }
    assert all("<" not in (s["content"] or "") for s in seen)
    assert all("tool_calls" not in s or s["tool_calls"] == final["tool_calls"] for s in seen)


@SETTINGS
@given(cuts=st.lists(st.integers(0, 400), max_size=15))
def test_stream_harmony_generated_order(cuts):
    text = (
        "<|channel|>analysis<|message|>User wants weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Rome", "metric": "true"}<|call|>'
    )
    _check_stream(get_family("gpt-oss"), text, "", _chunks(text, cuts))


# --------------------------------------------------------------------------------------------------
# hand-written model outputs (formats the templates cannot render back)
# --------------------------------------------------------------------------------------------------


def _call(name, args, call_id=None):
    call = {"type": "function"}
    if call_id:
        call["id"] = call_id
    call["function"] = {"name": name, "arguments": args}
    return call


def test_forced_think_without_opening_tag():
    text = "Let me check the map.\n</think>\n\nParis is sunny."
    for fam in ("deepseek-r1-distill-qwen", "deepseek-r1", "qwq"):
        got = parse_assistant(text + get_family(fam).end_of_turn[0], fam)
        assert got == {"role": "assistant", "content": "Paris is sunny.", "reasoning_content": "Let me check the map."}
    got = parse_assistant("Let me check.\n</think>\n\nYes.", "qwq", prefix="<think>\n")
    assert got == {"role": "assistant", "content": "Yes.", "reasoning_content": "Let me check."}


def test_truncated_reasoning_and_empty_think():
    assert parse_assistant("<think>\nstill going", "qwen3") == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "still going",
    }
    assert parse_assistant("<think>\n\n</think>\n\nHi<|im_end|>", "qwen3") == {"role": "assistant", "content": "Hi"}
    assert parse_assistant("R</think>C", "deepseek-v3.1", prefix="<think>") == {
        "role": "assistant",
        "content": "C",
        "reasoning_content": "R",
    }


def test_end_of_turn_and_trailing_junk_are_dropped():
    assert parse_assistant("Hi!<|eot_id|><|start_header_id|>user", "llama-3")["content"] == "Hi!"
    assert parse_assistant("Hi! </s> [INST] more", "llama-2")["content"] == "Hi!"
    assert parse_assistant("Hi!<end_of_turn>\n", "gemma-3")["content"] == "Hi!"
    assert parse_assistant("Hi!<|end|>\n<|endoftext|>", "phi-3")["content"] == "Hi!"
    assert parse_assistant("", "chatml") == {"role": "assistant", "content": ""}


def test_deepseek_v3_calls_with_string_arguments_are_typed():
    text = (
        "Let me look.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Oslo", "days": "4"}\n```<｜tool▁call▁end｜>\n'
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>ping\n```json\n{}\n```<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    )
    got = parse_assistant(text, "deepseek-v3", tools=TOOLS)
    assert got == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [_call("get_weather", {"city": "Oslo", "days": 4}), _call("ping", {})],
    }


def test_json_list_styles():
    granite = parse_assistant('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Lima"}}]', "granite-3.3")
    assert granite == {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "Lima"})]}
    phi = parse_assistant('functools[{"name": "ping", "arguments": {}}]<|end|>', "phi-4-mini")
    assert phi["tool_calls"] == [_call("ping", {})] and phi["content"] is None
    # the word alone is not a call
    assert parse_assistant("I like functools a lot", "phi-4-mini")["content"] == "I like functools a lot"


def test_hermes_style_for_smollm3_and_multiple_calls():
    as_string = json.dumps({"hour": "7", "labels": json.dumps(["a"])})  # arguments written as a JSON string
    text = (
        "<think>\nTwo calls.\n</think>\n"
        '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n'
        "<tool_call>\n" + json.dumps({"name": "set_alarm", "arguments": as_string}) + "\n</tool_call>"
    )
    got = parse_assistant(text, "smollm3", tools=TOOLS)
    assert got["reasoning_content"] == "Two calls."
    assert got["tool_calls"] == [_call("ping", {}), _call("set_alarm", {"hour": 7, "labels": ["a"]})]
    assert got["content"] is None


def test_malformed_tool_call_is_kept_as_content():
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    got = parse_assistant(text, "qwen2.5")
    assert "tool_calls" not in got and got["content"].startswith("Sure.\n<tool_call>")
    # streaming never shows the half call, and ends with the same answer
    _check_stream(get_family("qwen2.5"), text, "", list(text))


def test_harmony_variants():
    fam = "gpt-oss"
    # model-generated header order, constrain token, commentary preamble then final answer
    text = (
        "<|channel|>commentary<|message|>Looking it up.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 20C.<|return|>"
    )
    assert parse_assistant(text, fam) == {"role": "assistant", "content": "Looking it up.\nIt is 20C."}
    call = parse_assistant(
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Rome", "days": "2"}<|call|>',
        fam,
        tools=TOOLS,
    )
    assert call == {"role": "assistant", "content": None, "tool_calls": [_call("get_weather", {"city": "Rome", "days": 2})]}
    builtin = parse_assistant('<|channel|>analysis to=browser.search<|message|>{"query": "x"}<|call|>', fam)
    assert builtin["tool_calls"][0]["function"]["name"] == "browser.search"
    assert parse_assistant("plain answer<|return|>", fam) == {"role": "assistant", "content": "plain answer"}


def test_llama3_variants():
    fam = "llama-3"
    assert parse_assistant('{"name": "ping", "arguments": {}}<|eot_id|>', fam)["tool_calls"] == [_call("ping", {})]
    # two calls separated by ';'
    two = parse_assistant('{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}', fam)
    assert len(two["tool_calls"]) == 2
    # built-in tool form after <|python_tag|>
    built = parse_assistant('<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>', fam)
    assert built["tool_calls"] == [_call("brave_search", {"query": "weather in Paris"})]
    # JSON that is not a known tool is an answer, not a call
    answer = parse_assistant('{"name": "Bob", "parameters": {"age": 3}}', fam, tools=TOOLS)
    assert "tool_calls" not in answer and answer["content"].startswith('{"name": "Bob"')
    # and streaming hides a JSON answer until it is known not to be a call
    sp = StreamParser(fam, tools=TOOLS)
    assert sp.feed('{"name": "get_weather", "parameters": {"ci')["content"] == ""


def test_mistral_variants():
    v11 = parse_assistant('[TOOL_CALLS]ping[ARGS]{}[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}</s>', "mistral-small-3.2")
    assert v11["tool_calls"] == [_call("ping", {}), _call("get_weather", {"city": "Nice"})]
    v3 = parse_assistant('[TOOL_CALLS] [{"name": "ping", "arguments": {}, "id": "abcdefghi"}]</s>', "mistral-v0.3")
    assert v3["tool_calls"] == [_call("ping", {}, "abcdefghi")]


def test_cohere_action_and_granite_answer_tags():
    text = 'I will search.\nAction: ```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {"city": "Bern"}\n    }\n]\n```'
    got = parse_assistant(text, "command-r-tool-use")
    assert got == {"role": "assistant", "content": "I will search.", "tool_calls": [_call("get_weather", {"city": "Bern"})]}
    assert parse_assistant("Action: go left", "command-r-tool-use")["content"] == "Action: go left"
    granite = parse_assistant("<think>hmm</think><response>Yes.</response><|end_of_text|>", "granite-3.3")
    assert granite == {"role": "assistant", "content": "Yes.", "reasoning_content": "hmm"}


# --------------------------------------------------------------------------------------------------
# argument typing
# --------------------------------------------------------------------------------------------------


def test_arguments_are_typed_by_schema():
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "flag": {"type": "boolean"},
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "integer"}},
            "cfg": {"type": "object", "properties": {"depth": {"type": "integer"}}},
            "maybe": {"type": ["integer", "null"]},
            "either": {"anyOf": [{"type": "boolean"}, {"type": "number"}]},
            "free": {},
        },
    }
    raw = {
        "n": "3",
        "x": "2.5",
        "flag": "true",
        "name": 5,
        "tags": '["1", 2]',
        "cfg": {"depth": "7"},
        "maybe": "null",
        "either": "1.5",
        "free": "42",
        "unknown": "9",
    }
    assert coerce_arguments(raw, schema) == {
        "n": 3,
        "x": 2.5,
        "flag": True,
        "name": "5",
        "tags": [1, 2],
        "cfg": {"depth": 7},
        "maybe": None,
        "either": 1.5,
        "free": "42",
        "unknown": "9",
    }
    # already-correct values and ambiguous ones are left alone
    assert coerce_arguments({"n": 3.0, "x": 1, "flag": "yes", "name": "3"}, schema) == {
        "n": 3,
        "x": 1,
        "flag": "yes",
        "name": "3",
    }
    assert coerce_arguments('{"n": "4"}', schema) == {"n": 4}
    assert coerce_arguments({"n": "4.5"}, schema) == {"n": "4.5"}  # not an integer: kept as written


def test_tool_schemas_accept_several_shapes():
    bare = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    cohere = {"name": "g", "parameter_definitions": {"b": {"type": "int", "required": True}}}
    schemas = tool_schemas([TOOLS[0], bare, cohere, "junk"])  # type: ignore[list-item]
    assert set(schemas) == {"get_weather", "f", "g"}
    assert coerce_arguments({"b": "2"}, schemas["g"]) == {"b": 2}


@SETTINGS
@given(
    days=st.integers(-(10**9), 10**9),
    hour=st.floats(allow_nan=False, allow_infinity=False),
    city=_ANY_TEXT,
    as_string=st.booleans(),
)
def test_string_emitted_scalars_are_typed(days, hour, city, as_string):
    """A model that writes every scalar as a string gets typed arguments back."""
    args = {"days": str(days) if as_string else days, "city": city}
    text = "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": args}) + "\n</tool_call>"
    got = parse_assistant(text, "hermes-3", tools=TOOLS)["tool_calls"][0]["function"]["arguments"]
    assert got == {"days": days, "city": city}
    alarm = {"hour": repr(hour)}
    text = "[TOOL_CALLS][" + json.dumps({"name": "set_alarm", "arguments": alarm}) + "]"
    got = parse_assistant(text, "mistral-nemo", tools=TOOLS)["tool_calls"][0]["function"]["arguments"]
    assert got == {"hour": hour}
