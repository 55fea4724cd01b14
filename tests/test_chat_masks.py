"""Assistant masks for every corpus template, checked against what each conversation contains.

Conversations are generated (hypothesis) with distinct alphabets per role, so a mask that covers
any user or system text, or misses any assistant text, is caught by looking at the characters.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.chat.families import detect_family
from alignloop.chat.masks import assistant_spans, mask_conversation, token_mask
from alignloop.chat.render import ChatTemplate

CONFORMANCE = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
pytestmark = pytest.mark.skipif(not CONFORMANCE.exists(), reason="shared conformance data not present")


def _templates():
    if not CONFORMANCE.exists():
        return []
    index = json.loads((CONFORMANCE / "templates" / "index.json").read_text())
    return index


TEMPLATES = _templates()

# Disjoint vocabularies: assistant text uses only words from ASSISTANT, users only from USER.
ASSISTANT = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
USER = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
SYSTEM = ["sierra", "tango", "uniform"]


PROBE_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Look a thing up.",
                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}},
    # Cohere's tool_use template reads its own flat format.
    "name": "lookup", "description": "Look a thing up.",
    "parameter_definitions": {"q": {"description": "query", "type": "str", "required": True}},
}


def sentence(words):
    return st.lists(st.sampled_from(words), min_size=1, max_size=6).map(" ".join)


conversations = st.tuples(
    st.booleans(),  # with a system prompt
    st.lists(st.tuples(sentence(USER), sentence(ASSISTANT)), min_size=1, max_size=3),
    sentence(SYSTEM),
)


def build(with_system, turns, system_text):
    messages = [{"role": "system", "content": system_text}] if with_system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages


@pytest.fixture(scope="module")
def tokenizer():
    from alignloop.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_every_corpus_template_has_a_family():
    for entry in TEMPLATES:
        source = (CONFORMANCE / "templates" / f"{entry['family']}.jinja").read_text()
        assert detect_family(source) is not None, entry["family"]


@pytest.mark.parametrize("entry", TEMPLATES, ids=[e["family"] for e in TEMPLATES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv=conversations)
def test_mask_covers_exactly_the_assistant_turns(entry, conv, tokenizer):
    source = (CONFORMANCE / "templates" / f"{entry['family']}.jinja").read_text()
    family = detect_family(source)
    template = ChatTemplate(source, bos_token=entry["bos_token"], eos_token=entry["eos_token"])
    messages = build(*conv)
    tools = [PROBE_TOOL] if entry.get("requires_tools") else None
    try:
        text = template.render(messages, tools=tools, date_string="26 Jul 2024")
    except Exception:
        messages = build(False, conv[1], conv[2])  # e.g. "System role not supported"
        text = template.render(messages, tools=tools, date_string="26 Jul 2024")
    spans, dropped = assistant_spans(text, messages, family)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert not dropped and len(spans) == len(assistants)
    for i, ((start, end), content) in enumerate(zip(spans, assistants)):
        turn = text[start:end]
        assert content.strip() in turn
        # A closed turn ends with its end-of-turn string; only a final turn that the template
        # leaves open (chatml-vllm renders training conversations prefill-style) may not.
        open_final = i == len(spans) - 1 and end == len(text)
        assert open_final or any(turn.endswith(e) for e in family.end_of_turn), (family.name, turn)
        # Nothing but the assistant's words, whitespace and the format's own control strings.
        residue = turn.replace(content.strip(), "")
        for marker in family.markers:
            residue = residue.replace(marker, "")
        assert not any(w in residue for w in USER + SYSTEM), (family.name, turn)
    covered = "".join(text[s:e] for s, e in spans)
    assert not any(w in covered for w in USER + SYSTEM)

    # Token level, with a real tokenizer's offsets: the masked tokens decode to the spans' text.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = token_mask(encoded["offset_mapping"], spans)
    masked = "".join(text[a:b] for (a, b), m in zip(encoded["offset_mapping"], mask) if m)
    assert all(c.strip() in masked for c in assistants)
    assert not any(w in masked for w in USER + SYSTEM)


def test_mask_conversation_on_smollm2_tokenizer(tokenizer):
    messages = [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "alpha bravo"},
                {"role": "user", "content": "three"}, {"role": "assistant", "content": "charlie"}]
    out = mask_conversation(tokenizer, messages)
    assert tokenizer.decode([t for t, m in zip(out.input_ids, out.mask) if m]) == \
        "alpha bravo<|im_end|>charlie<|im_end|>"
    assert out.dropped == []


def test_qwen3_history_reasoning_is_not_masked_but_final_reasoning_is(tokenizer):
    source = (CONFORMANCE / "templates" / "qwen3.jinja").read_text()
    messages = [{"role": "user", "content": "one"},
                {"role": "assistant", "content": "alpha", "reasoning_content": "old thoughts"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "bravo", "reasoning_content": "new thoughts"}]
    out = mask_conversation(tokenizer, messages, template=source, eos_token="<|im_end|>")
    masked = out.masked_text()
    assert "old thoughts" not in out.text  # the template strips reasoning from history
    assert "new thoughts" in masked and "alpha<|im_end|>" in masked and masked.endswith("bravo<|im_end|>")


def test_a_dropped_assistant_message_gets_no_span():
    source = (CONFORMANCE / "templates" / "qwen2.5-instruct.jinja").read_text()
    family = detect_family(source)
    text = "<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nbravo<|im_end|>\n"
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "alpha"},
                {"role": "assistant", "content": "bravo"}]
    spans, dropped = assistant_spans(text, messages, family)
    assert dropped == [1] and [text[s:e] for s, e in spans] == ["bravo<|im_end|>"]


def _corpus_cases():
    if not CONFORMANCE.exists():
        return []
    rows = [json.loads(line) for line in (CONFORMANCE / "corpus" / "transformers_goldens.jsonl").open()]
    return [r for r in rows if "expected" in r and any(m["role"] == "assistant" for m in r["messages"])]


CASES = _corpus_cases()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_mask_on_every_corpus_shape_that_renders(case):
    """Every conversation shape of the corpus (tool calls, reasoning, continue_final, ...) on every
    template that renders it: each rendered assistant turn's span holds its text and closes with an
    end-of-turn string, and no user/system/tool text is inside a span."""
    family = detect_family((CONFORMANCE / case["template"]).read_text())
    text, messages = case["expected"], case["messages"]
    spans, dropped = assistant_spans(text, messages, family)
    assistants = [m for m in messages if m["role"] == "assistant"]
    assert len(spans) + len(dropped) == len(assistants)
    for i, (start, end) in enumerate(spans):
        turn = text[start:end]
        closed = any(turn.endswith(e) for e in family.end_of_turn)
        next_turn = any(text.startswith(t, end) for t in family.turn_starts)  # template wrote no end
        assert closed or next_turn or (i == len(spans) - 1 and end == len(text)), (case["id"], turn)
    others = [m["content"] for m in messages if m["role"] != "assistant" and isinstance(m.get("content"), str)
              and len(m["content"]) > 12]
    covered = [text[s:e] for s, e in spans]
    assert not any(o in turn for o in others for turn in covered), case["id"]
    rendered = [m for m in assistants if (m.get("content") or "").strip() and m["content"].strip() in text]
    assert len(spans) >= len(rendered), case["id"]  # every assistant text the template kept is masked
