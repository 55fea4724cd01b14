"""`alignloop template ...` sub-app, driven through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignloop.cli.template import app as template_app
from alignloop.chat.render import render
from alignloop.errors import AlignloopError

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
pytestmark = pytest.mark.skipif(not (CORPUS / "templates" / "index.json").is_file(),
                                reason="chat-template conformance corpus not present")

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of [France]?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
]
TOOL = {"type": "function", "function": {"name": "lookup_capital", "description": "Find a capital.",
                                         "parameters": {"type": "object", "properties": {"country": {"type": "string"}}}}}


@pytest.fixture()
def files(tmp_path):
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps(MESSAGES))
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOL]))
    return messages, tools


def invoke(*args):
    return CliRunner().invoke(template_app, [str(a) for a in args])


def _entry(name):
    return next(e for e in json.loads((CORPUS / "templates" / "index.json").read_text()) if e["family"] == name)


def test_render_corpus_template(files):
    messages, _ = files
    result = invoke("render", "qwen2.5-instruct", "--messages", messages, "--generation-prompt")
    assert result.exit_code == 0, result.output
    source = (CORPUS / "templates" / "qwen2.5-instruct.jinja").read_text()
    assert result.stdout == render(source, MESSAGES, eos_token="<|im_end|>", add_generation_prompt=True) + "\n"


def test_render_file_family_and_zoo_model(files, tmp_path):
    messages, tools = files
    path = tmp_path / "mine.jinja"
    path.write_text((CORPUS / "templates" / "zephyr.jinja").read_text())
    result = invoke("render", path, "--messages", messages)
    assert result.exit_code == 0 and "<|user|>\nCapital of [France]?</s>" in result.stdout
    # a chat family name picks that family's corpus template (with its bos/eos)
    result = invoke("render", "mistral-v0.3", "--messages", messages, "--tools", tools)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("<s>[INST]") and "lookup_capital" in result.stdout
    # a zoo model: its tokenizer's own template
    result = invoke("render", "smollm2-135m", "--messages", messages, "-g")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("<|im_start|>assistant\n\n")


def test_render_mistakes_are_alignloop_errors(files, tmp_path):
    messages, _ = files
    for args, words in [
        (("render", "no-such-thing", "--messages", messages), "not a template file"),
        (("render", tmp_path / "missing.jinja", "--messages", messages), "not found"),
        (("render", "chatml", "--messages", tmp_path / "absent.json"), "not found"),
        (("render", "gemma-2", "--messages", messages), "System role not supported"),
    ]:
        result = invoke(*args)
        assert isinstance(result.exception, AlignloopError), (args, result.output)
        assert words in str(result.exception) and "\n" not in str(result.exception)
    bad = tmp_path / "bad.json"
    bad.write_text('{"messages": [1, 2]}')
    result = invoke("render", "chatml", "--messages", bad)
    assert isinstance(result.exception, AlignloopError) and "role" in str(result.exception)


def test_diff(files):
    messages, _ = files
    result = invoke("diff", "chatml", "llama-3", "--messages", messages)
    assert result.exit_code == 0, result.output
    assert "chatml" in result.stdout and "llama-3.1-instruct" in result.stdout
    assert "<|im_start|>user" in result.stdout and "<|start_header_id|>user<|end_header_id|>" in result.stdout
    assert "render differently" in result.stdout
    same = invoke("diff", "llama-3.1-instruct", "llama-3.3-instruct", "--messages", messages)
    assert same.exit_code == 0 and "identical renders" in same.stdout


def test_lint_exit_codes():
    result = invoke("lint", "mistral-7b-instruct-v0.3")
    assert result.exit_code == 1
    assert "system_dropped" in result.stdout and "not_prefix_stable" in result.stdout
    clean = invoke("lint", "llama-3.1-instruct")  # warnings only
    assert clean.exit_code == 0, clean.output
    assert "reasoning_stripped" in clean.stdout and "error" not in clean.stdout


def test_lint_with_a_tokenizer():
    result = invoke("lint", "llama-3.1-instruct", "--tokenizer", "smollm2-135m")
    assert result.exit_code == 1
    assert "family_mismatch" in result.stdout and "<|eot_id|>" in result.stdout
    own = invoke("lint", "smollm2-135m")  # the model's template against its own tokenizer
    assert own.exit_code == 0, own.output
    assert "family_mismatch" not in own.stdout and "double_bos" not in own.stdout


def test_cost_with_plot(tmp_path):
    pytest.importorskip("mistral_common")
    out = tmp_path / "cost.png"
    result = invoke("cost", "mistral-nemo", "qwen3", "--plot", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    nemo_smol = next(line for line in lines if "mistral-nemo-tekken" in line and "smollm2" in line)
    nemo_real = next(line for line in lines if "mistral-nemo-tekken" in line and "mistral-common tekken" in line)
    assert [c.strip() for c in nemo_real.split("│")[3:5]] == ["10", "3"]  # mistral-common's own count
    assert "qwen3" in result.stdout and nemo_smol
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cost_rejects_unknown_names():
    result = invoke("cost", "nope-7b")
    assert isinstance(result.exception, AlignloopError)
