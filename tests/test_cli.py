"""The CLI end to end (in-process, tiny model): one-line errors, run folders, skip, resume."""

import json

import pytest
from typer.testing import CliRunner

from alignloop import cli

runner = CliRunner()


def invoke(*args):
    """Run the CLI as `main()` does: user errors become one line on stderr and exit code 2."""
    try:
        result = runner.invoke(cli.app, list(args), catch_exceptions=False)
    except cli.AlignloopError as e:
        return 2, f"error: {e}"
    return result.exit_code, result.output


def write_recipe(tmp_path, body: str, prompts: str | None = None):
    if prompts is not None:
        (tmp_path / "prompts.jsonl").write_text(prompts)
    path = tmp_path / "r.toml"
    path.write_text(body)
    return path


GOOD = """
[run]
name = "t"
dir = "{dir}"
[model]
name = "tiny"
[sampling]
max_tokens = 4
[generate]
prompts = "prompts.jsonl"
chunk = 2
"""

PROMPTS = "\n".join([
    json.dumps({"id": "a", "messages": [{"role": "user", "content": "hi"}]}),
    "{not json",
    json.dumps({"id": "b", "prompt": "Once upon"}),
    json.dumps({"prompt": "x", "messages": []}),
    json.dumps({"id": "c", "messages": [{"role": "user", "content": "bye"}]}),
    "",
    json.dumps({"id": "d", "prompt": "The end"}),
]) + "\n"


@pytest.mark.parametrize("body,expected", [
    ('[model]\nnmae = "tiny"\n[generate]\nprompts = "prompts.jsonl"\n', "unknown key 'model.nmae'"),
    ('[sampling]\nmax_tokens = "lots"\n[generate]\nprompts = "prompts.jsonl"\n', "sampling.max_tokens"),
    ('[generate]\nprompts = "missing.jsonl"\n', "file not found: missing.jsonl"),
    ('[generate\n', "not valid TOML"),
    ('[model]\nname = "tiny"\n', "missing required key 'generate'"),
])
def test_bad_recipe_is_one_clear_line(tmp_path, body, expected):
    path = write_recipe(tmp_path, body, prompts=PROMPTS)
    code, out = invoke("generate", str(path))
    assert code == 2
    assert expected in out and str(path) in out
    assert len(out.strip().splitlines()) == 1


def test_missing_recipe_and_bad_override(tmp_path):
    code, out = invoke("generate", str(tmp_path / "nope.toml"))
    assert code == 2 and "recipe not found" in out
    path = write_recipe(tmp_path, GOOD.format(dir=tmp_path / "runs"), prompts=PROMPTS)
    code, out = invoke("generate", str(path), "--set", "sampling.nope=1")
    assert code == 2 and "sampling.nope" in out


def test_unknown_model_is_one_clear_line():
    code, out = invoke("chat", "--model", "gpt-17", "hello")
    assert code == 2 and "unknown model 'gpt-17'" in out and "smollm2-135m" in out
    assert len(out.strip().splitlines()) == 1


def test_main_prints_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["alignloop", "chat", "--model", "nope-model", "hi"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'nope-model'") and len(err.strip().splitlines()) == 1


def generate(tmp_path, prompts: str):
    """`alignloop --quiet generate` of GOOD on `prompts`: (recipe, stage folder, completions, quarantined)."""
    path = write_recipe(tmp_path, GOOD.format(dir=tmp_path / "runs"), prompts=prompts)
    code, out = invoke("--quiet", "generate", str(path))
    assert code == 0, out
    stage = tmp_path / "runs" / "t" / "generate"
    rows = [json.loads(x) for x in (stage / "completions.jsonl").read_text().splitlines()]
    bad = [json.loads(x) for x in (stage / "quarantine.jsonl").read_text().splitlines()]
    return path, stage, rows, bad


def test_generate_writes_a_run_folder_quarantines_and_skips(tmp_path):
    path, stage, rows, bad = generate(tmp_path, PROMPTS)
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert [b["line"] for b in bad] == [2, 4] and "not JSON" in bad[0]["reason"]
    assert all(1 <= len(r["token_ids"]) <= 4 and len(r["logprobs"]) == len(r["token_ids"]) for r in rows)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["counts"] == {"lines": 6, "ok": 4, "quarantined": 2}
    assert set(manifest["outputs"]) == {"completions.jsonl", "quarantine.jsonl"}
    assert manifest["config"]["model"]["name"] == "tiny"
    metrics = (stage / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # two chunks of two
    before = (stage / "manifest.json").read_text()
    code, _ = invoke("--quiet", "generate", str(path))
    assert code == 0 and (stage / "manifest.json").read_text() == before  # skipped: unchanged
    code, _ = invoke("--quiet", "generate", str(path), "--set", "sampling.max_tokens=2")
    assert code == 0 and (stage / "manifest.json").read_text() != before  # config changed: re-ran


def test_generate_resumes_from_a_partial_file(tmp_path):
    from alignloop.engine.config import GenerateRecipe
    from alignloop.engine.stage import run_generate
    from alignloop.recipes import load_recipe
    from alignloop.runs import config_hash

    runs = tmp_path / "runs"
    path = write_recipe(tmp_path, GOOD.format(dir=runs), prompts=PROMPTS)
    first = run_generate(load_recipe(path, GenerateRecipe))
    full = (first.dir / "completions.jsonl").read_text().splitlines()
    # Simulate a kill after the first chunk, mid-way through writing the next line.
    for f in first.dir.iterdir():
        f.unlink()
    partial = first.dir / f"completions.partial-{config_hash(first.config)[:12]}.jsonl"
    partial.write_text("\n".join(full[:2]) + "\n" + full[2][:10])
    again = run_generate(load_recipe(path, GenerateRecipe))
    assert (again.dir / "completions.jsonl").read_text().splitlines() == full
    assert not partial.exists()
    assert (again.dir / "metrics.jsonl").read_text().count("\n") == 1  # only the missing chunk ran
