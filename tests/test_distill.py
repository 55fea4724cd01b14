"""Distillation: the top-k KL, the tokenizer check, a logit-level run, the sequence-level path."""

import json
from pathlib import Path

import pytest
import torch

from alignloop.errors import AlignloopError
from alignloop.train import distill as distill_module
from alignloop.train.distill import topk_kl, topk_logprobs

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "distill_tiny.toml"


# --- the KL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["bucket", "renormalise"])
def test_topk_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(tail):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 50, generator=g) * 3
    student = torch.randn(6, 50, generator=g) * 3
    ids, logps = topk_logprobs(teacher, k=5)
    for direction in ("forward", "reverse"):
        same = topk_kl(teacher, ids, logps, direction, tail)
        assert same.abs().max() < 1e-5
        assert (topk_kl(student, ids, logps, direction, tail) > 1e-3).all()
    forward = topk_kl(student, ids, logps, "forward", tail)
    reverse = topk_kl(student, ids, logps, "reverse", tail)
    assert not torch.allclose(forward, reverse, rtol=1e-2)


def test_tail_bucket_sees_mass_outside_the_top_k_and_survives_peaked_teachers():
    teacher = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    ids, logps = topk_logprobs(teacher, k=2)
    # Same ratio between the two top tokens, but most of the mass elsewhere.
    student = torch.tensor([[1.0, 0.0, 3.0, 3.0, 3.0, 3.0]])
    assert topk_kl(student, ids, logps, tail="renormalise").item() < 1e-6  # blind to it
    assert topk_kl(student, ids, logps, tail="bucket").item() > 0.5
    # A teacher with all its mass in the top k: a zero tail, no NaN, still finite gradients.
    sharp = torch.tensor([[200.0, 0.0, 0.0, 0.0]])
    ids, logps = topk_logprobs(sharp, k=1)
    x = torch.zeros(1, 4, requires_grad=True)
    for direction in ("forward", "reverse"):
        kl = topk_kl(x, ids, logps, direction)
        kl.sum().backward()
        assert torch.isfinite(kl).all() and torch.isfinite(x.grad).all() and kl.item() > 0.5


# --- the tokenizer check -----------------------------------------------------------------------


def _save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_mismatched_tokenizers_are_refused_in_one_line(tmp_path, tiny):
    import copy

    from alignloop.recipes import load_recipe
    from alignloop.train.config import DistillRecipe
    from alignloop.train.stage import run_distill

    model, tokenizer = tiny
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<|brand-new|>"])
    folder = _save(model, other, tmp_path / "teacher")
    recipe = load_recipe(TINY_RECIPE, DistillRecipe, [f"run.dir={tmp_path / 'runs'}", f"teacher.name={folder}"])
    with pytest.raises(AlignloopError, match="share a tokenizer") as err:
        run_distill(recipe)
    assert "\n" not in str(err.value) and "49153" in str(err.value) and 'distill.level = "sequence"' in str(err.value)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    # Sequence level does not care.
    distill_module.check_same_tokenizer(tokenizer, copy.deepcopy(tokenizer), "a", "b")


# --- runs --------------------------------------------------------------------------------------


def test_logit_distillation_lowers_kl_to_a_peaked_teacher(tmp_path, monkeypatch):
    from alignloop.models import load_model
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DistillRecipe
    from alignloop.train.distill import TOPK_FILE
    from alignloop.train.stage import run_distill

    # (A Llama teacher: a saved qwen2 folder reloads with transformers' Qwen2 pre-tokenizer, which
    # splits "\r\n" differently from SmolLM2's, and the tokenizer check rightly refuses it.)
    teacher, tokenizer = load_model("tiny", seed=1)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8)  # logits x 8: a confident teacher, far from the random student
    folder = _save(teacher, tokenizer, tmp_path / "teacher")
    calls = []
    real = distill_module._teacher_forward
    monkeypatch.setattr(distill_module, "_teacher_forward", lambda m, b: (calls.append(1), real(m, b))[1])
    base = [f"run.dir={tmp_path / 'runs'}", f"teacher.name={folder}", "train.eval_every=0",
            "train.max_seq_len=128", "train.micro_batch=4", "distill.top_k=8"]
    stage = run_distill(load_recipe(TINY_RECIPE, DistillRecipe, [*base, "train.steps=8", "train.lr=2e-2"]))
    kl = [json.loads(line)["kl"] for line in stage.path("metrics.jsonl").read_text().splitlines()]
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert first > 0.2 and last < 0.6 * first, kl
    final = json.loads(stage.path("manifest.json").read_text())["train"]
    assert final["eval_kl"] < first and final["eval_loss"] == final["eval_kl"]  # loss = KL (weights all 1)
    n_calls = len(calls)
    assert n_calls == 9  # one pass over the 36 conversations, 4 per batch

    # Run again: the teacher's top-k come from the cache.
    again = run_distill(load_recipe(TINY_RECIPE, DistillRecipe, [*base, "train.steps=8", "train.lr=2e-2"]),
                        force=True)
    assert len(calls) == n_calls
    assert TOPK_FILE in json.loads(again.path("manifest.json").read_text())["outputs"]


def test_sequence_level_makes_an_sft_dataset_from_engine_answers(tmp_path, tiny):
    from alignloop.engine.engine import Engine
    from alignloop.recipes import load_recipe
    from alignloop.engine.config import SamplingSection
    from alignloop.train.config import DistillRecipe
    from alignloop.train.distill import GENERATIONS, teacher_generations
    from alignloop.train.stage import run_distill
    from alignloop.train.sft_data import Conversation, read_conversations, tokenize

    model, tokenizer = tiny
    convs = [Conversation([{"role": "user", "content": "Name a colour."}], 1.0, "t:1"),
             Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Old answer."}], 0.5, "t:2"),
             Conversation([{"role": "system", "content": "No user here."}], 1.0, "t:3")]
    engine = Engine(model, tokenizer, dtype="float32", show_progress=False)
    sampling = SamplingSection(max_tokens=6, temperature=1.0)
    rows, counts = teacher_generations(engine, convs, sampling, keep_truncated=True)
    assert counts.answered == 2 and counts.replaced_answers == 1 and counts.skipped_no_prompt == 1
    assert rows[1]["messages"][:1] == convs[1].messages[:1] and rows[1]["weight"] == 0.5
    assert rows[1]["messages"][-1]["content"] != "Old answer."
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _ = tokenize(tokenizer, read_conversations(path), 256, last_turn_only=True)
    learned = tokenizer.decode([t for t, m in zip(examples[0].input_ids, examples[0].loss_mask) if m])
    assert learned == rows[0]["messages"][-1]["content"] + "<|im_end|>"
    with pytest.raises(AlignloopError, match="no usable answer"):
        teacher_generations(engine, convs[:1], SamplingSection(max_tokens=1))  # all cut off

    # The whole stage: the teacher answers, the student does SFT on the answers.
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"}]}) + "\n"
                            for i in range(6)))
    recipe = load_recipe(TINY_RECIPE, DistillRecipe, [
        f"run.dir={tmp_path / 'runs'}", f"data.path={data}", "distill.level=sequence", "distill.responses=teacher",
        "distill.keep_truncated=true", "sampling.max_tokens=8", "train.steps=2", "train.eval_fraction=0"])
    stage = run_distill(recipe)
    generated = read_conversations(stage.path(GENERATIONS))
    assert len(generated) == 6 and all(c.messages[-1]["role"] == "assistant" for c in generated)
    manifest = json.loads(stage.path("manifest.json").read_text())
    assert manifest["generation"]["answered"] == 6 and manifest["train"]["steps"] == 2
    assert "ce" in json.loads(stage.path("metrics.jsonl").read_text().splitlines()[-1])


def test_bad_input_is_a_clear_error_or_a_counted_skip(tmp_path):
    """Empty data, rows without an answer to distil on, rows longer than max_seq_len, a context overrun."""
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DistillRecipe
    from alignloop.train.stage import run_distill

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    user = {"role": "user", "content": "Name a fruit."}
    ok = {"messages": [user, {"role": "assistant", "content": "A pear."}]}
    long = {"messages": [user, {"role": "assistant", "content": "pear " * 200}]}
    base = [f"run.dir={tmp_path / 'runs'}", "train.max_seq_len=128", "train.steps=1", "train.eval_fraction=0",
            "train.micro_batch=2"]

    def run(data, *more):
        return run_distill(load_recipe(TINY_RECIPE, DistillRecipe, [*base, f"data.path={data}", *more]), force=True)

    with pytest.raises(AlignloopError, match="empty"):
        run(write("empty.jsonl", []))
    with pytest.raises(AlignloopError, match="no assistant tokens in any of the 2"):
        run(write("prompts.jsonl", [{"messages": [user]}] * 2))  # responses = data: nothing to distil on
    with pytest.raises(AlignloopError, match="longer than the student's context of 4096"):
        run(write("ok.jsonl", [ok]), "train.max_seq_len=5000")
    stage = run(write("mixed.jsonl", [ok, long, {"messages": [user]}, ok]))
    data = json.loads(stage.path("manifest.json").read_text())["data"]
    assert (data["rows"], data["kept"], data["skipped_too_long"], data["skipped_no_assistant"]) == (4, 2, 1, 1)
