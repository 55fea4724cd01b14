"""SFT: packing isolation, assistant-only masks, sample weights, LoRA, a real run, bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignloop.errors import AlignloopError
from alignloop.train.packing import Example, collate, pack
from alignloop.train.sft import SFTObjective, per_token_losses
from alignloop.train.sft_data import Conversation, read_conversations, tokenize

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "sft_tiny.toml"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times ten?"}, {"role": "assistant", "content": "Forty."}],
    [{"role": "user", "content": "Say something nice about tea."},
     {"role": "assistant", "content": "Tea is a warm pause in a busy day."}],
]


def _examples(tokenizer, weights=(1.0, 1.0, 1.0), **kwargs):
    convs = [Conversation(m, w, f"t:{i}") for i, (m, w) in enumerate(zip(CONVERSATIONS, weights))]
    examples, _ = tokenize(tokenizer, convs, max_seq_len=kwargs.pop("max_seq_len", 512), **kwargs)
    return examples


# --- packing -----------------------------------------------------------------------------------


def test_pack_is_first_fit_decreasing_and_refuses_overlong():
    assert pack([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    with pytest.raises(ValueError, match="longer than max_len"):
        pack([9], 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_each_conversation_its_own_losses(tiny, attn):
    """Block-diagonal mask + restarting positions: packing changes no token's loss (1e-5, fp32)."""
    model, tokenizer = tiny
    model.set_attn_implementation(attn)
    try:
        examples = _examples(tokenizer)
        packed = per_token_losses(model, collate([examples]))
        alone = torch.cat([per_token_losses(model, collate([[e]])) for e in examples])
        # Also two rows of different length in one batch: padding must not leak either.
        batch = per_token_losses(model, collate([examples[:1], examples[1:]]))
    finally:
        model.set_attn_implementation("sdpa")
    assert packed.shape == alone.shape == (sum(sum(e.loss_mask) for e in examples),)
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)
    assert torch.allclose(batch, alone, atol=1e-5, rtol=0)
    assert torch.isfinite(packed).all()


def test_without_isolation_the_losses_would_differ(tiny):
    """The check above has teeth: a plain causal mask over the packed row changes later losses."""
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    batch = collate([examples])
    joined = Example([t for e in examples for t in e.input_ids], [m for e in examples for m in e.loss_mask])
    leaky = collate([[joined]])  # one document: a plain causal mask and running positions
    assert not torch.allclose(per_token_losses(model, batch)[-5:], per_token_losses(model, leaky)[-5:], atol=1e-3)


# --- masks -------------------------------------------------------------------------------------


def test_loss_only_on_assistant_tokens(tiny):
    _, tokenizer = tiny
    examples = _examples(tokenizer)
    learned = [tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in examples]
    assert learned == ["Paris.<|im_end|>", "Four.<|im_end|>Forty.<|im_end|>",
                       "Tea is a warm pause in a busy day.<|im_end|>"]
    # In the batch: position t scores token t+1, and exactly the masked tokens are scored.
    batch = collate([examples])
    assert batch.targets[batch.loss_mask].tolist() == [t for e in examples for t, m in
                                                       zip(e.input_ids, e.loss_mask) if m]

    last = _examples(tokenizer, last_turn_only=True)
    assert tokenizer.decode([t for t, m in zip(last[1].input_ids, last[1].loss_mask) if m]) == "Forty.<|im_end|>"


def test_sample_weights_scale_each_conversations_loss(tiny):
    model, tokenizer = tiny
    from alignloop.train.logprobs import TokenLogprobs

    module, objective = TokenLogprobs(model), SFTObjective()
    with torch.no_grad():
        full = float(objective.loss(module, collate([_examples(tokenizer)]))[0])
        half = float(objective.loss(module, collate([_examples(tokenizer, weights=(0.5, 0.5, 0.5))]))[0])
        mixed = float(objective.loss(module, collate([_examples(tokenizer, weights=(1.0, 0.0, 2.0))]))[0])
        parts = [float(objective.loss(module, collate([[e]]))[0]) for e in _examples(tokenizer)]
    assert half == pytest.approx(0.5 * full, rel=1e-6)
    assert mixed == pytest.approx(parts[0] + 2 * parts[2], rel=1e-5)
    # The step's normaliser is the count of loss tokens, not the sum of weights: a uniformly
    # down-weighted batch really pulls less.
    assert objective.weight(collate([_examples(tokenizer, weights=(0.5, 0.5, 0.5))])) == \
        objective.weight(collate([_examples(tokenizer)]))


# --- whole runs --------------------------------------------------------------------------------


def test_sft_run_lowers_loss_and_writes_a_loadable_model(tmp_path):
    from alignloop.models import load_model
    from alignloop.cli.train import app as train_app

    args = ["sft", str(TINY_RECIPE), "--set", f"run.dir={tmp_path}", "--set", "train.steps=16",
            "--set", "train.max_seq_len=128", "--set", "train.eval_every=8"]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    stage_dir = tmp_path / "sft-tiny" / "sft"
    metrics = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 17))
    first, last = sum(m["ce"] for m in metrics[:3]) / 3, sum(m["ce"] for m in metrics[-3:]) / 3
    assert last < first - 1.0, (first, last)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0]
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["data"]["kept"] == 36 and manifest["train"]["steps"] == 16
    assert "model/model.safetensors" in manifest["outputs"]

    _, tokenizer = load_model(str(stage_dir / "model"))  # a plain HF checkpoint folder
    assert tokenizer.chat_template
    # Same recipe again: up to date, skipped.
    again = CliRunner().invoke(train_app, args)
    assert again.exit_code == 0 and "up to date" in again.output


def test_lora_run_changes_only_adapter_weights(tmp_path, tiny):
    """(With bf16 autocast on, as the real recipe runs.)"""
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    recipe = load_recipe(TINY_RECIPE, SFTRecipe, [f"run.dir={tmp_path}", "train.steps=4", "train.max_seq_len=128",
                                                  "train.lora.r=4", "train.lora.targets=['q_proj', 'v_proj']",
                                                  "train.eval_fraction=0", "train.bf16=true"])
    stage = run_sft(recipe)
    trained = load_file(next((stage.path("checkpoints")).iterdir()) / "trainable.safetensors")
    assert trained and all("lora_" in name for name in trained)
    assert any(name.endswith("lora_B.default.weight") and t.abs().sum() > 0 for name, t in trained.items())

    base, _ = tiny  # the same random init (model.seed = 0), never trained
    merged = load_file(stage.path("model") / "model.safetensors")
    for name, before in base.state_dict().items():
        if name not in merged:
            continue  # tied lm_head
        changed = not torch.equal(before, merged[name])
        assert changed == (("q_proj" in name or "v_proj" in name) and name.endswith("weight")), name


# --- bad input ---------------------------------------------------------------------------------


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_input_is_a_clear_error_or_a_counted_skip(tmp_path, tiny, capsys):
    _, tokenizer = tiny
    user = {"role": "user", "content": "hi"}
    with pytest.raises(AlignloopError, match="empty"):
        read_conversations(_write(tmp_path, []))
    with pytest.raises(AlignloopError, match=r"d.jsonl:2: not JSON"):
        read_conversations(_write(tmp_path, [{"messages": [user]}, "{oops"]))
    with pytest.raises(AlignloopError, match=r":1: 'weight' must be"):
        read_conversations(_write(tmp_path, [{"messages": [user], "weight": -1}]))
    with pytest.raises(AlignloopError, match=r"messages\[0\] needs a string 'role'"):
        read_conversations(_write(tmp_path, [{"messages": [{"content": "x"}]}]))

    # No assistant turn anywhere: nothing to learn, said plainly.
    with pytest.raises(AlignloopError, match="no assistant tokens"):
        tokenize(tokenizer, read_conversations(_write(tmp_path, [{"messages": [user]}] * 3)), 512)

    # Too long: skipped and counted, with a warning; never truncated.
    long = {"messages": [user, {"role": "assistant", "content": "word " * 300}]}
    short = {"messages": [user, {"role": "assistant", "content": "hello"}]}
    examples, counts = tokenize(tokenizer, read_conversations(_write(tmp_path, [long, short, long])), 128)
    assert len(examples) == 1 and counts.skipped_too_long == 2 and counts.kept == 1
    assert "skipped 2 of 3 conversation(s) longer than max_seq_len=128" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(AlignloopError, match="no conversation left.*2 too long"):
        tokenize(tokenizer, read_conversations(_write(tmp_path, [long, long])), 128)


def test_max_seq_len_beyond_the_models_context_is_refused(tmp_path):
    """A conversation longer than the model's positions would train on extrapolated rotary garbage."""
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    recipe = load_recipe(TINY_RECIPE, SFTRecipe, [f"run.dir={tmp_path}", "train.max_seq_len=5000"])
    with pytest.raises(AlignloopError, match=r"train.max_seq_len=5000 is longer than the model's context of 4096"):
        run_sft(recipe)
    assert not (tmp_path / "sft-tiny" / "sft" / "checkpoints").exists()


def test_recipe_errors_name_the_key(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe

    with pytest.raises(AlignloopError, match="unknown key 'train.lr_peak'"):
        load_recipe(TINY_RECIPE, SFTRecipe, ["train.lr_peak=1e-3"])
    with pytest.raises(AlignloopError, match="train.schedule"):
        load_recipe(TINY_RECIPE, SFTRecipe, ["train.schedule=linear"])
    with pytest.raises(AlignloopError, match="data.path: file not found"):
        load_recipe(TINY_RECIPE, SFTRecipe, ["data.path=nope.jsonl"])
    assert load_recipe(REPO / "recipes" / "sft.toml", SFTRecipe).train.lora.r == 16


def test_parquet_rows_read_like_jsonl(tmp_path):
    """Parquet (what the dataset builders write): struct fields absent in a message come back None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = REPO / "recipes" / "data" / "sft_demo.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for row in rows:
        row["user_id"] = "u1"  # extra columns are ignored
        row.setdefault("weight", None)  # a null weight means 1
    rows[0]["messages"][0]["name"] = "alice"  # every other message gets name=None in the struct
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")
    from_parquet = read_conversations(tmp_path / "sft.parquet")
    from_jsonl = read_conversations(jsonl)
    assert [c.weight for c in from_parquet] == [c.weight for c in from_jsonl]
    assert from_parquet[1].messages == from_jsonl[1].messages  # no "name": None left behind
    assert from_parquet[0].messages[0]["name"] == "alice"


def test_max_conversations_draws_a_seeded_subset_in_file_order():
    from alignloop.train.sft_data import draw_conversations

    convs = [Conversation(CONVERSATIONS[i % 3], 1.0, f"t:{i}") for i in range(50)]
    drawn = draw_conversations(convs, 10, seed=3)
    assert len(drawn) == 10 and drawn == draw_conversations(convs, 10, seed=3)
    assert [c.where for c in drawn] == sorted((c.where for c in drawn), key=lambda w: int(w[2:]))
    assert drawn != draw_conversations(convs, 10, seed=4)
    assert draw_conversations(convs, None, 0) is convs and draw_conversations(convs, 50, 0) is convs


def test_a_capped_run_tokenizes_only_what_it_draws(tmp_path):
    from alignloop.cli.train import app as train_app

    args = ["sft", str(TINY_RECIPE), "--set", f"run.dir={tmp_path}", "--set", "train.steps=2",
            "--set", "train.max_seq_len=128", "--set", "train.max_conversations=12"]
    result = CliRunner().invoke(train_app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "sft-tiny" / "sft" / "manifest.json").read_text())
    assert manifest["data"]["kept"] == 12
    assert "12 of 36 conversations" in result.output.replace("\n", " ")
