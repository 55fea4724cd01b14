"""Chat-template lint: every kind checked on the corpus templates that have it (and on those that don't)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from alignloop.chat.lint import KINDS, Finding, lint_template, prefix_stability

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
pytestmark = pytest.mark.skipif(not (CORPUS / "templates" / "index.json").is_file(),
                                reason="chat-template conformance corpus not present")


def _index() -> dict[str, dict]:
    return {e["family"]: e for e in json.loads((CORPUS / "templates" / "index.json").read_text())}


def _source(name: str) -> str:
    return (CORPUS / "templates" / f"{name}.jinja").read_text()


def _lint(name: str, **kwargs) -> list[Finding]:
    entry = _index()[name]
    kwargs.setdefault("bos_token", entry["bos_token"])
    kwargs.setdefault("eos_token", entry["eos_token"])
    return lint_template(_source(name), **kwargs)


@pytest.fixture(scope="module")
def fired() -> dict[tuple[str, str], set[str]]:
    """(kind, severity) -> the corpus templates (linted with their declared bos/eos) where it fires."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name in _index():
        for finding in _lint(name):
            assert finding.kind in KINDS and finding.severity in ("error", "warning", "info")
            assert finding.message and "\n" not in finding.message
            out[(finding.kind, finding.severity)].add(name)
    return out


def _any(fired, kind: str) -> set[str]:
    return set().union(*(names for (k, _), names in fired.items() if k == kind))


@pytest.fixture(scope="module")
def notes() -> dict[str, set[str]]:
    """semantic note -> corpus templates whose transformers golden carries it."""
    out: dict[str, set[str]] = defaultdict(set)
    for line in (CORPUS / "corpus" / "transformers_goldens.jsonl").read_text().splitlines():
        case = json.loads(line)
        for note in case.get("semantic_notes") or ():
            out[note].add(case["family"])
    return out


def _smollm2():
    from alignloop.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


# ---------------------------------------------------------------------------------------- system


def test_system_dropped(fired, notes):
    # Mistral v0.3 / Nemo: the system prompt sits before the last user turn, so it vanishes once the
    # conversation ends with an assistant or tool turn; Phi-4-reasoning never renders it.
    assert fired[("system_dropped", "error")] == {"mistral-7b-instruct-v0.3", "mistral-nemo-tekken", "phi-4-reasoning"}
    # Gemma-2 ("System role not supported") and Mistral v0.1 (alternation) raise on a system message.
    assert fired[("system_dropped", "warning")] == {"gemma-2", "mistral-7b-instruct-v0.1"}
    assert notes["dropped:system"] <= _any(fired, "system_dropped")


def test_system_dropped_message_names_the_mistral_case():
    (finding,) = [f for f in _lint("mistral-7b-instruct-v0.3") if f.kind == "system_dropped"]
    assert "assistant turn" in finding.message and "tool result" in finding.message
    (raised,) = [f for f in _lint("gemma-2") if f.kind == "system_dropped"]
    assert "System role not supported" in raised.message


# ---------------------------------------------------------------------------------------- tools

NO_TOOL_SUPPORT = {"chatml", "chatml-vllm", "command-r", "gemma-2", "gemma-3", "llama-2-chat",
                   "mistral-7b-instruct-v0.1", "phi-3-mini", "phi-3.5-mini", "phi-4", "phi-4-reasoning",
                   "smollm2-instruct", "zephyr"}


def test_tools_ignored(fired, notes):
    # DeepSeek templates render tool calls but never the schemas; Phi-4-mini reads them from the
    # system message instead of tools=.
    deepseek = {"deepseek-v3", "deepseek-r1", "deepseek-r1-0528", "deepseek-r1-distill-qwen", "deepseek-v3.1"}
    assert _any(fired, "tools_ignored") == NO_TOOL_SUPPORT | deepseek | {"phi-4-mini"}
    assert notes["tool_schema_and_call_missing"] | notes["tool_schema_missing"] <= _any(fired, "tools_ignored")


def test_tools_are_rendered_by_tool_templates(fired):
    for name in ("llama-3.1-instruct", "mistral-7b-instruct-v0.3", "qwen2.5-instruct", "qwen3", "gpt-oss",
                 "hermes-3-tool_use", "command-r-plus-tool_use", "granite-3.3", "smollm3", "mistral-small-3.2"):
        assert name not in _any(fired, "tools_ignored"), name


def test_templates_that_require_tools_are_still_linted():
    for name in ("hermes-3-tool_use", "command-r-plus-tool_use"):
        kinds = {f.kind for f in _lint(name)}
        assert not kinds & {"tools_ignored", "tool_calls_ignored", "tool_results_ignored", "system_dropped"}, name


def test_tool_calls_ignored(fired, notes):
    # DeepSeek-V3 / R1-distill have a tool-call branch that HF's None-dropping never reaches: an error.
    assert fired[("tool_calls_ignored", "error")] == {"deepseek-v3", "deepseek-r1-distill-qwen"}
    assert fired[("tool_calls_ignored", "warning")] == NO_TOOL_SUPPORT | {"granite-3.3", "smollm3", "phi-4-mini"}
    assert notes["tool_schema_and_call_missing"] | notes["tool_call_missing"] <= _any(fired, "tool_calls_ignored")


def test_tool_results_ignored(fired, notes):
    silently = {f for f in fired[("tool_results_ignored", "warning")]
                if any("silently" in x.message for x in _lint(f) if x.kind == "tool_results_ignored")}
    assert silently == {"phi-3-mini", "phi-3.5-mini", "phi-4", "phi-4-reasoning", "zephyr"} == notes["tool_result_missing"]
    # the others raise on a tool message (strict user/assistant alternation)
    assert _any(fired, "tool_results_ignored") - silently == {"command-r", "gemma-2", "gemma-3", "llama-2-chat",
                                                             "mistral-7b-instruct-v0.1"}


# ---------------------------------------------------------------------------------------- reasoning


def test_reasoning_stripped(fired, notes):
    # Only Qwen3 and gpt-oss render the final turn's reasoning; both strip it from history by design.
    assert fired[("reasoning_stripped", "info")] == {"qwen3", "gpt-oss"}
    assert fired[("reasoning_stripped", "warning")] == set(_index()) - {"qwen3", "gpt-oss"}
    assert fired[("reasoning_stripped", "warning")] <= notes["reasoning_not_rendered"]


def test_reasoning_message_distinguishes_reasoning_templates():
    (r1,) = [f for f in _lint("deepseek-r1") if f.kind == "reasoning_stripped"]
    (llama,) = [f for f in _lint("llama-3.1-instruct") if f.kind == "reasoning_stripped"]
    (qwq,) = [f for f in _lint("qwq-32b") if f.kind == "reasoning_stripped"]
    assert "no notion of reasoning" in llama.message and "no notion" not in r1.message
    assert "inline" in qwq.message


# ---------------------------------------------------------------------------------------- prefix stability


def test_prefix_stability_matches_corpus():
    expected = json.loads((CORPUS / "corpus" / "prefix_stability.json").read_text())
    for name, entry in _index().items():
        got = prefix_stability(_source(name), bos_token=entry["bos_token"], eos_token=entry["eos_token"])
        want = expected[name]
        assert got["history_prefix_fail_at"] == want["history_prefix_fail_at"], name
        assert got["genprompt_mismatch_at"] == want["genprompt_mismatch_at"], name
        assert (got["error"] is None) == (want["error"] is None), name
        if want["error"]:
            assert got["error"] == want["error"], name


def test_not_prefix_stable(fired):
    expected = json.loads((CORPUS / "corpus" / "prefix_stability.json").read_text())
    unstable = {n for n, e in expected.items() if e["history_prefix_fail_at"] or e["genprompt_mismatch_at"]}
    assert unstable == {"mistral-7b-instruct-v0.3", "mistral-nemo-tekken", "qwen3", "qwq-32b",
                        "deepseek-r1-distill-qwen", "phi-3-mini", "phi-3.5-mini", "phi-4-mini", "gpt-oss",
                        "command-r-plus-tool_use"}
    assert fired[("not_prefix_stable", "warning")] == unstable
    qwq = [f.message for f in _lint("qwq-32b") if f.kind == "not_prefix_stable"]
    assert len(qwq) == 1 and "generation prompt" in qwq[0]


# ---------------------------------------------------------------------------------------- eos


def test_eos_not_end_of_turn(fired):
    # Declared eos vs the string written after each assistant turn.
    assert fired[("eos_not_end_of_turn", "warning")] == {"gemma-2", "gemma-3", "phi-3-mini", "phi-3.5-mini",
                                                        "phi-4-mini"}


def test_llama3_with_base_eos_never_stops():
    findings = _lint("llama-3.1-instruct", eos_token="<|end_of_text|>")
    (finding,) = [f for f in findings if f.kind == "eos_not_end_of_turn"]
    assert "<|end_of_text|>" in finding.message and "<|eot_id|>" in finding.message
    assert not [f for f in _lint("llama-3.1-instruct", eos_token="<|eot_id|>") if f.kind == "eos_not_end_of_turn"]


# ---------------------------------------------------------------------------------------- double BOS


def _bos_adding_tokenizer(bos: str, *, post_processor: bool = True, wrap: bool = False):
    """A tiny word-level tokenizer whose post-processor prepends `bos` (as Llama/Mistral/Gemma's do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, bos: 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([bos, "</s>"])
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, 1)])
    if not wrap:
        return tok
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>")


def _kinds(findings):
    return {f.kind for f in findings}


@pytest.mark.parametrize("name", ["llama-2-chat", "llama-3.1-instruct", "mistral-7b-instruct-v0.3",
                                  "mistral-nemo-tekken", "gemma-3", "deepseek-r1", "command-r"])
def test_double_bos_fires_when_template_and_tokenizer_both_add_bos(name):
    bos = _index()[name]["bos_token"]
    findings = _lint(name, tokenizer=_bos_adding_tokenizer(bos))
    (finding,) = [f for f in findings if f.kind == "double_bos"]
    assert finding.severity == "error" and bos in finding.message


def test_double_bos_with_a_transformers_tokenizer():
    assert "double_bos" in _kinds(_lint("llama-2-chat", tokenizer=_bos_adding_tokenizer("<s>", wrap=True)))


def test_no_double_bos_without_a_bos_adding_tokenizer_or_a_bos_in_the_render():
    assert "double_bos" not in _kinds(_lint("llama-2-chat", tokenizer=_bos_adding_tokenizer("<s>", post_processor=False)))
    # Qwen2.5 and Phi-3 render no BOS, so a BOS-adding tokenizer gives exactly one
    for name, bos in (("qwen2.5-instruct", "<|endoftext|>"), ("phi-3-mini", "<s>")):
        assert "double_bos" not in _kinds(_lint(name, bos_token=bos, tokenizer=_bos_adding_tokenizer(bos))), name
    # SmolLM2's real tokenizer adds nothing
    assert "double_bos" not in _kinds(_lint("smollm2-instruct", tokenizer=_smollm2()))


# ---------------------------------------------------------------------------------------- family mismatch


def test_family_mismatch_llama3_template_on_smollm2_tokenizer():
    findings = _lint("llama-3.1-instruct", tokenizer=_smollm2())
    (finding,) = [f for f in findings if f.kind == "family_mismatch"]
    assert finding.severity == "error" and "<|eot_id|>" in finding.message and "smollm2" in finding.message
    # and SmolLM2's eos is not Llama-3's end of turn either
    assert "eos_not_end_of_turn" in _kinds(_lint("llama-3.1-instruct", eos_token=None, tokenizer=_smollm2()))


def test_family_mismatch_across_the_corpus_with_smollm2():
    tok = _smollm2()
    by_severity: dict[str, set[str]] = defaultdict(set)
    for name in _index():
        for f in _lint(name, tokenizer=tok):
            if f.kind == "family_mismatch":
                by_severity[f.severity].add(name)
    # ChatML-based templates: every turn boundary is a SmolLM2 token, only the family differs
    assert by_severity["warning"] == {"qwen2.5-instruct", "qwen3", "qwq-32b", "phi-4", "phi-4-reasoning", "smollm3"}
    assert {"llama-2-chat", "llama-3.1-instruct", "mistral-7b-instruct-v0.3", "gemma-2", "deepseek-v3", "gpt-oss",
            "zephyr", "granite-3.3", "command-r"} <= by_severity["error"]
    # SmolLM2's own template and plain ChatML (its parent format) match
    assert not ({"smollm2-instruct", "chatml", "chatml-vllm"} & (by_severity["error"] | by_severity["warning"]))


def test_smollm2_tokenizer_with_its_own_template_has_no_token_findings():
    tok = _smollm2()
    findings = lint_template(tok.chat_template, tokenizer=tok)
    assert not _kinds(findings) & {"double_bos", "family_mismatch", "eos_not_end_of_turn", "system_dropped",
                                   "not_prefix_stable"}


def test_findings_are_sorted_by_severity():
    order = [f.severity for f in _lint("phi-4-reasoning")]
    assert order == sorted(order, key=["error", "warning", "info"].index)
