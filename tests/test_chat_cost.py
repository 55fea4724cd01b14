"""Chat-template token costs: checked against mistral-common's reference counts and transformers' tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignloop.chat.cost import (
    ANSWER,
    FOLLOW_UP,
    QUESTION,
    SYSTEM,
    cost_plot,
    cost_table,
    count_tokens,
    mistral_tokenizer,
    template_costs,
)
from alignloop.chat.render import render

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
pytestmark = pytest.mark.skipif(not (CORPUS / "templates" / "index.json").is_file(),
                                reason="chat-template conformance corpus not present")
MISTRAL = {"mistral-7b-instruct-v0.1": "v1", "mistral-7b-instruct-v0.3": "v3", "mistral-nemo-tekken": "tekken"}


def _index() -> dict[str, dict]:
    return {e["family"]: e for e in json.loads((CORPUS / "templates" / "index.json").read_text())}


def _source(name: str) -> str:
    return (CORPUS / "templates" / f"{name}.jinja").read_text()


def _costs(name: str, tokenizer) -> dict:
    entry = _index()[name]
    return template_costs(_source(name), tokenizer, bos_token=entry["bos_token"], eos_token=entry["eos_token"])


@pytest.fixture(scope="module")
def smollm2():
    from alignloop.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _goldens() -> list[dict]:
    path = CORPUS / "corpus" / "mistral_common_goldens.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------------- mistral-common


@pytest.mark.parametrize("golden", [g for g in _goldens() if g["hf_equals_reference"]], ids=lambda g: g["id"])
def test_mistral_common_counts_match_the_goldens(golden):
    pytest.importorskip("mistral_common")
    entry = _index()[golden["family"]]
    tok = mistral_tokenizer(MISTRAL[golden["family"]])
    text = render(_source(golden["family"]), golden["messages"], bos_token=entry["bos_token"],
                  eos_token=entry["eos_token"], add_generation_prompt=True)
    assert text == golden["reference_text"]
    total = count_tokens(tok, text)
    content = sum(count_tokens(tok, m["content"], content=True) for m in golden["messages"])
    assert (total, content, total - content) == (golden["reference_tokens"], golden["content_tokens"],
                                                 golden["overhead_tokens"])


@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "mistral-nemo-tekken"])
def test_template_costs_add_up_to_the_golden_overheads(name):
    pytest.importorskip("mistral_common")
    costs = _costs(name, mistral_tokenizer(MISTRAL[name]))
    golden = {g["id"].rsplit("/", 1)[1]: g for g in _goldens() if g["family"] == name}
    # the goldens use the very conversation template_costs measures
    assert golden["sys_multi_gen"]["messages"][0]["content"] == SYSTEM
    assert [m["content"] for m in golden["nosys_multi_gen"]["messages"]] == [QUESTION, ANSWER, FOLLOW_UP]
    assert costs["tokens"] == golden["single_user"]["reference_tokens"]
    assert costs["one_turn"] == golden["single_user"]["overhead_tokens"]
    assert costs["one_turn"] + costs["per_exchange"] == golden["nosys_multi_gen"]["overhead_tokens"]
    assert costs["one_turn"] + costs["per_exchange"] + costs["per_system"] == golden["sys_multi_gen"]["overhead_tokens"]
    assert costs["per_tool"] > 50  # [AVAILABLE_TOOLS] block with the JSON schema


def test_mistral_v1_costs_and_system_error():
    pytest.importorskip("mistral_common")
    costs = _costs("mistral-7b-instruct-v0.1", mistral_tokenizer("v1"))
    assert (costs["tokens"], costs["one_turn"]) == (15, 8)  # = mistral-common's reference count for one turn
    assert costs["per_system"] is None and costs["notes"]["per_system"].startswith("raises")
    assert costs["per_tool"] is None and costs["notes"]["per_tool"] == "ignored"


# ---------------------------------------------------------------------------------------- SmolLM2's tokenizer


def test_counts_equal_transformers_apply_chat_template(smollm2):
    messages = [{"role": "user", "content": QUESTION}]
    ids = smollm2.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    costs = template_costs(smollm2.chat_template, smollm2, bos_token=smollm2.bos_token, eos_token=smollm2.eos_token)
    assert costs["tokens"] == len(ids)
    assert costs["one_turn"] == len(ids) - len(smollm2(QUESTION, add_special_tokens=False)["input_ids"])
    # a raw tokenizers.Tokenizer counts the same
    text = "<|im_start|>user\nhi<|im_end|>"
    assert count_tokens(smollm2.backend_tokenizer, text) == count_tokens(smollm2, text) == len(
        smollm2(text, add_special_tokens=False)["input_ids"])


def test_costs_of_every_corpus_template(smollm2):
    question = count_tokens(smollm2, QUESTION, content=True)
    for name in _index():
        costs = _costs(name, smollm2)
        assert costs["tokens"] - costs["one_turn"] == question, name
        assert costs["one_turn"] > 0 and costs["per_exchange"] > 0, name
        for metric in ("per_system", "per_exchange", "per_tool"):
            assert (costs[metric] is None) == (metric in costs["notes"]), (name, metric)


def test_known_cost_facts(smollm2):
    llama = _costs("llama-3.1-instruct", smollm2)
    chatml = _costs("chatml", smollm2)
    assert llama["one_turn"] > 5 * chatml["one_turn"]  # the date preamble in every Llama-3 prompt
    assert chatml["per_tool"] is None and chatml["notes"]["per_tool"] == "ignored"
    assert _costs("qwen2.5-instruct", smollm2)["per_system"] < 0  # replaces "You are Qwen, created by ..."
    assert _costs("gemma-2", smollm2)["notes"]["per_system"].startswith("raises")
    assert _costs("phi-4-reasoning", smollm2)["notes"]["per_system"] == "ignored"
    hermes = _costs("hermes-3-tool_use", smollm2)  # needs tools: measured with tools=[]
    assert hermes["per_tool"] > 50


def test_cost_table_and_plot(smollm2, tmp_path):
    from rich.console import Console

    rows = [{"template": name, "tokenizer": "smollm2", **_costs(name, smollm2)} for name in ("chatml", "gemma-2")]
    console = Console(record=True, width=200)
    console.print(cost_table(rows))
    text = console.export_text()
    assert "chatml" in text and "gemma-2" in text and "ignored" in text and "raises" in text
    assert str(rows[0]["one_turn"]) in text
    path = cost_plot(rows, tmp_path / "sub" / "cost.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
