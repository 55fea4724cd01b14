"""Chat families: the registry, fingerprint detection, and the recorded facts checked against real templates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from alignloop.chat.families import (
    ALIASES,
    FAMILIES,
    Family,
    detect_family,
    detect_family_of_tokenizer,
    get_family,
    matching_families,
)
from tool_schemas import function_tool

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
TEMPLATES = CORPUS / "templates"
needs_corpus = pytest.mark.skipif(not TEMPLATES.is_dir(), reason="chat-template conformance corpus not present")

# corpus template file -> the family it must be detected as
EXPECTED = {
    "chatml": "chatml",
    "chatml-vllm": "chatml",
    "command-r": "command-r",
    "command-r-plus-tool_use": "command-r-tool-use",
    "deepseek-r1": "deepseek-r1",
    "deepseek-r1-0528": "deepseek-r1-0528",
    "deepseek-r1-distill-qwen": "deepseek-r1-distill-qwen",
    "deepseek-v3": "deepseek-v3",
    "deepseek-v3.1": "deepseek-v3.1",
    "gemma-2": "gemma-2",
    "gemma-3": "gemma-3",
    "gpt-oss": "gpt-oss",
    "granite-3.3": "granite-3.3",
    "hermes-3-tool_use": "hermes-3",
    "llama-2-chat": "llama-2",
    "llama-3.1-instruct": "llama-3",
    "llama-3.2-instruct": "llama-3",
    "llama-3.3-instruct": "llama-3",
    "mistral-7b-instruct-v0.1": "mistral-v0.1",
    "mistral-7b-instruct-v0.3": "mistral-v0.3",
    "mistral-nemo-tekken": "mistral-nemo",
    "mistral-small-3.2": "mistral-small-3.2",
    "phi-3-mini": "phi-3",
    "phi-3.5-mini": "phi-3",
    "phi-4": "phi-4",
    "phi-4-mini": "phi-4-mini",
    "phi-4-reasoning": "phi-4-reasoning",
    "qwen2.5-instruct": "qwen2.5",
    "qwen3": "qwen3",
    "qwq-32b": "qwq",
    "smollm2-instruct": "smollm2",
    "smollm3": "smollm3",
    "zephyr": "zephyr",
}

REQUIRED = [
    "llama-2", "llama-3", "mistral-v0.1", "mistral-v0.3", "mistral-nemo", "mistral-small-3.2", "qwen2.5", "qwen3",
    "qwq", "deepseek-v3", "deepseek-r1", "deepseek-r1-0528", "deepseek-r1-distill-qwen", "deepseek-v3.1", "gemma-2",
    "gemma-3", "phi-3", "phi-4", "phi-4-mini", "phi-4-reasoning", "gpt-oss", "chatml", "smollm2", "smollm3", "zephyr",
    "command-r", "command-r-tool-use", "hermes-3", "granite-3.3",
]  # fmt: skip


def _stems() -> list[str]:
    if not TEMPLATES.is_dir():
        return []
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def _source(stem: str) -> str:
    return (TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")


def _index() -> dict[str, dict]:
    return {e["family"]: e for e in json.loads((TEMPLATES / "index.json").read_text(encoding="utf-8"))}


def _render(template: str, messages: list[dict], *, tools=None, add_generation_prompt=False, bos=None, eos=None, **kw):
    """Render with the project's renderer when it exists, else transformers' (same HF semantics)."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        from alignloop.chat.render import render  # type: ignore[attr-defined]
    except ImportError:
        render = None
    if render is not None:
        return render(
            template, messages, tools=tools, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos, **kw
        )
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    out, _ = render_jinja_template(
        [messages], tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt, **tokens, **kw
    )
    return out[0]


TOOLS = [function_tool("get_weather", "Weather for a city",
                       {"city": {"type": "string", "description": "City name"}}, ["city"])]


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


def test_every_required_family_is_registered():
    assert set(REQUIRED) <= set(FAMILIES)
    for name, fam in FAMILIES.items():
        assert isinstance(fam, Family) and fam.name == name
        assert fam.assistant_headers and all(fam.assistant_headers)
        assert fam.end_of_turn and all(fam.end_of_turn)
        assert fam.system in ("native", "folded", "ignored", "unsupported")
        assert fam.variant_of is None or fam.variant_of in FAMILIES
        if fam.reasoning:
            assert fam.reasoning.final_turn in ("field", "inline", "dropped")
            assert fam.reasoning.final_turn != "field" or fam.reasoning.template_field
        if fam.tool_calls:
            assert fam.tool_calls.template_arguments in ("object", "string")
        json.dumps(fam.to_dict())  # plain data


def test_families_are_frozen():
    fam = get_family("qwen3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fam.name = "x"  # type: ignore[misc]


def test_get_family_names_aliases_and_error():
    assert get_family("qwen3") is FAMILIES["qwen3"]
    assert get_family("Llama-3.1").name == "llama-3"
    assert get_family("llama-3.3").name == "llama-3"
    assert get_family("phi-3.5").name == "phi-3"
    assert get_family("harmony").name == "gpt-oss"
    assert get_family(FAMILIES["zephyr"]) is FAMILIES["zephyr"]
    assert all(target in FAMILIES for target in ALIASES.values())
    with pytest.raises(KeyError) as err:
        get_family("no-such-format")
    message = str(err.value)
    assert "no-such-format" in message and "qwen3" in message and "gpt-oss" in message


def test_family_facts_used_downstream():
    qwq = get_family("qwq")
    assert qwq.reasoning and qwq.reasoning.forced_open and qwq.generation_prefill == "<think>\n"
    r1d = get_family("deepseek-r1-distill-qwen")
    assert r1d.reasoning and r1d.reasoning.forced_open
    assert get_family("deepseek-v3.1").generation_prefill == "</think>"
    assert get_family("llama-3").stop_strings[:2] == ("<|eot_id|>", "<|eom_id|>")
    assert "<|return|>" in get_family("gpt-oss").end_of_turn and "<|call|>" in get_family("gpt-oss").end_of_turn
    assert get_family("qwen2.5").tool_calls.start == "<tool_call>"
    assert get_family("mistral-v0.3").tool_calls.id_length == 9
    assert get_family("gemma-2").supports_system is False
    assert "<|im_end|>" in get_family("chatml").markers
    assert get_family("deepseek-r1").tool_calls.template_arguments == "string"


def test_round_trip_table():
    """What survives render -> parse for the final assistant turn (documented in each family's notes)."""
    rt = {name: fam.round_trip for name, fam in FAMILIES.items()}
    assert rt["qwen3"] >= {"content", "reasoning", "tool_calls", "content_with_tool_calls", "multiple_tool_calls"}
    assert rt["gpt-oss"] >= {"reasoning", "tool_calls"} and "multiple_tool_calls" not in rt["gpt-oss"]
    assert "reasoning" not in rt["deepseek-r1"] and "tool_calls" in rt["deepseek-r1"]
    assert "tool_calls" not in rt["deepseek-v3"] and "tool_calls" not in rt["deepseek-r1-distill-qwen"]
    assert "content_with_tool_calls" not in rt["llama-3"] and "multiple_tool_calls" not in rt["llama-3"]
    assert "tool_call_ids" in rt["mistral-v0.3"] and "tool_call_ids" in rt["mistral-small-3.2"]
    assert rt["chatml"] == {"content"} and rt["gemma-2"] == {"content"}
    assert "reasoning" in rt["qwq"] and "reasoning" in rt["phi-4-reasoning"]


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------


@needs_corpus
def test_corpus_is_fully_mapped():
    assert set(_stems()) == set(EXPECTED), "update EXPECTED when the corpus changes"
    assert {EXPECTED[s] for s in EXPECTED} <= set(FAMILIES)


@needs_corpus
@pytest.mark.parametrize("stem", _stems())
def test_detects_every_corpus_template(stem):
    source = _source(stem)
    fam = detect_family(source)
    assert fam is not None and fam.name == EXPECTED[stem]
    # fingerprints are unambiguous on the corpus: exactly one family matches
    assert [f.name for f in matching_families(source)] == [EXPECTED[stem]]


# templates from huggingface.js's independent test corpus: same formats are recognised, others are not claimed
HFJS_EXPECTED = {
    "hfjs/_base": "chatml",
    "hfjs/llama": "llama-2",
    "hfjs/TheBloke/Mistral-7B-Instruct-v0.1-GPTQ": "mistral-v0.1",
    "hfjs/mistralai/Mixtral-8x7B-Instruct-v0.1": "mistral-v0.1",
    "hfjs/mistralai/Mistral-7B-Instruct-v0.3 (JSON Schema)": "mistral-v0.3",
    "hfjs/mistralai/Mistral-Nemo-Instruct-2407": "mistral-nemo",
    "hfjs/NousResearch/Hermes-2-Pro-Llama-3-8B (JSON Schema)": "hermes-3",
    "hfjs/meta-llama/Llama-3.1-8B-Instruct": "llama-3",
    "hfjs/deepseek-ai/DeepSeek-R1": "deepseek-r1",
    "hfjs/Qwen/Qwen2.5-7B-Instruct": "qwen2.5",
    "hfjs/Qwen/Qwen3-0.6B": "qwen3",
    "hfjs/HuggingFaceTB/SmolLM3-3B": "smollm3",
    "hfjs/CohereForAI/c4ai-command-r-v01": "command-r-tool-use",
    "hfjs/zai-org/GLM-5.1": None,
    "hfjs/CohereLabs/c4ai-command-a-03-2025": None,
    "hfjs/moonshotai/Kimi-K2-Thinking": None,
    "hfjs/blenderbot": None,
    "hfjs/bloom": None,
}


@pytest.mark.skipif(not (CORPUS / "corpus" / "hfjs_goldens.jsonl").is_file(), reason="hfjs goldens not present")
def test_detection_on_independent_templates():
    seen = {}
    for line in (CORPUS / "corpus" / "hfjs_goldens.jsonl").read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        source = case.get("template") or case.get("chat_template")
        if case["id"] in HFJS_EXPECTED and isinstance(source, str):
            fam = detect_family(source)
            seen[case["id"]] = fam.name if fam else None
    assert seen == HFJS_EXPECTED


def test_detection_ignores_model_names_and_junk():
    assert detect_family("") is None
    assert detect_family("{{ messages[0]['content'] }}") is None
    assert detect_family("Qwen Llama Mistral gemma phi deepseek") is None
    # a template is recognised by its structure whatever it is called
    chatml = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    assert detect_family(chatml).name == "chatml"


class _FakeTokenizer:
    def __init__(self, chat_template=None, special=()):
        self.chat_template = chat_template
        self.all_special_tokens = list(special)

    def get_added_vocab(self):
        return {t: i for i, t in enumerate(self.all_special_tokens)}


@needs_corpus
def test_detect_family_of_tokenizer_variants():
    named = {"default": _source("command-r"), "tool_use": _source("command-r-plus-tool_use")}
    assert detect_family_of_tokenizer(_FakeTokenizer(named)).name == "command-r"
    legacy = [{"name": "tool_use", "template": _source("hermes-3-tool_use")}]
    assert detect_family_of_tokenizer(_FakeTokenizer(legacy)).name == "hermes-3"
    assert detect_family_of_tokenizer(_FakeTokenizer(None, ["<|begin_of_text|>", "<|start_header_id|>"])).name == "llama-3"
    assert detect_family_of_tokenizer(_FakeTokenizer(None, ["<s>"])) is None


def test_smollm2_tokenizer_is_smollm2():
    from alignloop.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    assert detect_family_of_tokenizer(tok).name == "smollm2"


# --------------------------------------------------------------------------------------------------
# the recorded facts agree with the real templates
# --------------------------------------------------------------------------------------------------


def _conversation(fam: Family, *extra: dict) -> list[dict]:
    conv = [{"role": "user", "content": "Hello?"}, *extra]
    return conv


def _render_stem(stem: str, *extra: dict, **kw) -> tuple[Family, str]:
    """The corpus template of `stem` rendered on `_conversation(fam, *extra)` with its family's tools and tokens."""
    fam = get_family(EXPECTED[stem])
    meta = _index()[stem]
    tools = TOOLS if fam.requires_tools else None
    return fam, _render(_source(stem), _conversation(fam, *extra), tools=tools, bos=meta["bos_token"],
                        eos=meta["eos_token"], **kw)


@needs_corpus
@pytest.mark.parametrize("stem", _stems())
def test_generation_prompt_ends_with_header_and_prefill(stem):
    fam, prompt = _render_stem(stem, add_generation_prompt=True)
    assert prompt.endswith(fam.assistant_headers[0] + fam.generation_prefill)


@needs_corpus
@pytest.mark.parametrize("stem", _stems())
def test_assistant_turn_is_closed_by_end_of_turn(stem):
    meta = _index()[stem]
    fam, text = _render_stem(stem, {"role": "assistant", "content": "Answer-XYZ"}, {"role": "user", "content": "More?"})
    after = text[text.index("Answer-XYZ") + len("Answer-XYZ") :].lstrip(" ")
    assert after.startswith(fam.end_of_turn), after[:40]
    before = text[: text.index("Answer-XYZ")]
    openers = [h + tail for h in fam.assistant_headers for tail in ("", " ", fam.generation_prefill)]
    if fam.name == "gpt-oss":
        openers.append("<|start|>assistant<|channel|>final<|message|>")
    assert any(before.endswith(o) for o in openers), before[-40:]
    # every control string the template writes is one the family knows about (the exceptions are plain
    # text in the system prompt, or only appear in an error message)
    for marker in meta["special_strings_in_template"]:
        if marker not in ("<SYS>", "<tools>", "</tools>", "<|final|>"):
            assert marker in fam.markers, marker


@needs_corpus
def test_prefix_stability_flags_match_the_corpus():
    stability = json.loads((CORPUS / "corpus" / "prefix_stability.json").read_text(encoding="utf-8"))
    for stem, result in stability.items():
        if result["error"] or stem not in EXPECTED:
            continue
        stable = not result["history_prefix_fail_at"] and not result["genprompt_mismatch_at"]
        assert get_family(EXPECTED[stem]).prefix_stable == stable, stem


@needs_corpus
def test_index_tokens_agree_with_families():
    index = _index()
    for stem, name in EXPECTED.items():
        fam = get_family(name)
        eos = index[stem]["eos_token"]
        assert eos in fam.stop_strings or eos == fam.eos_token, (stem, eos)
