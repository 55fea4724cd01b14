"""DPO / IPO / SimPO: the losses by hand, response-only scoring, the reference cache, a real run."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignloop.errors import AlignloopError
from alignloop.train import dpo as dpo_module
from alignloop.train.dpo import PreferenceObjective, preference_loss
from alignloop.train.dpo_data import (
    PairBatches,
    TokenizedPair,
    collate_pairs,
    limit_pairs,
    read_pairs,
    tokenize_pairs,
)
from alignloop.train.packing import Example

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "dpo_tiny.toml"
FAST = ["train.max_seq_len=128", "train.micro_batch=2"]


def _softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# --- the losses --------------------------------------------------------------------------------

POLICY = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]])
REFERENCE = torch.tensor([[-11.0, -11.0], [-5.0, -5.0]])
LENGTHS = torch.tensor([[4.0, 6.0], [2.0, 3.0]])


def test_dpo_loss_by_hand():
    loss, rewards = preference_loss(POLICY, REFERENCE, LENGTHS, "dpo", beta=0.1)
    # pair 0: rewards 0.1 * (+1) and 0.1 * (-1); pair 1: 0 and 0.1 * (+1)
    assert rewards.flatten().tolist() == pytest.approx([0.1, -0.1, 0.0, 0.1])
    assert loss.tolist() == pytest.approx([_softplus(-0.2), _softplus(0.1)], rel=1e-6)


def test_ipo_loss_by_hand():
    loss, _ = preference_loss(POLICY, REFERENCE, LENGTHS, "ipo", beta=0.1)
    # h = log-ratio(chosen) - log-ratio(rejected): 1 - (-1) = 2 and 0 - 1 = -1; target 1/(2 beta) = 5
    assert loss.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2], rel=1e-6)


def test_simpo_loss_by_hand_and_needs_no_reference():
    loss, rewards = preference_loss(POLICY, None, LENGTHS, "simpo", beta=2.0, gamma=0.5)
    # rewards = beta * logp / length: pair 0: 2 * -10/4 = -5, 2 * -12/6 = -4; pair 1: -5, -8/3
    assert rewards.flatten().tolist() == pytest.approx([-5.0, -4.0, -5.0, -8 / 3], rel=1e-6)
    assert loss.tolist() == pytest.approx([_softplus(1.0 + 0.5), _softplus(7 / 3 + 0.5)], rel=1e-6)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss(POLICY, None, LENGTHS, "dpo", beta=0.1)


def test_objective_sums_response_tokens_per_side_and_applies_weights():
    """Two pairs packed in one row: each scored token lands in its own pair's side."""
    def ex(ids, mask):
        return Example(ids, mask)

    a = TokenizedPair(0, ex([1, 2, 3, 4], [0, 0, 1, 1]), ex([1, 2, 5], [0, 0, 1]), 1.0, "u")
    b = TokenizedPair(1, ex([7, 8, 9], [0, 1, 1]), ex([7, 6, 6, 6], [0, 0, 1, 1]), 0.5, "v")
    reference = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    batch = collate_pairs([[a, b]], reference=reference)
    assert batch.packed.input_ids.shape == (1, 14) and batch.n_pairs == 2

    def module(input_ids, position_ids, allowed, select, targets, segments=None):  # log p(token) = -0.1 * id
        return -0.1 * targets.float()

    seq = dpo_module.sequence_logps(module, batch)
    assert seq.flatten().tolist() == pytest.approx([-0.7, -0.5, -1.7, -1.2])
    assert batch.lengths.tolist() == [[2, 1], [2, 2]]
    objective = PreferenceObjective("dpo", beta=1.0)
    loss, stats = objective.loss(module, batch)
    # ratios: pair a: (-0.7+1) - (-0.5+1) = -0.2; pair b: (-1.7+2) - (-1.2+2) = -0.5
    assert float(loss) == pytest.approx(_softplus(0.2) + 0.5 * _softplus(0.5), rel=1e-5)
    assert stats["margin_sum"] == pytest.approx(-0.7) and stats["accuracy_sum"] == 0.0
    assert objective.weight(batch) == 2.0
    # A tie counts as half right (the untrained policy is its own reference: accuracy 0.5, not 0).
    _, tie = objective.loss(module, collate_pairs([[a]], reference=seq[:1].clone()))
    assert tie["accuracy_sum"] == 0.5


# --- data --------------------------------------------------------------------------------------


def test_builder_table_reads_and_only_the_response_is_scored(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignloop.data.builders import PAIRS

    _, tokenizer = tiny
    context = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Name a fruit."}]
    row = {"example_id": "pair:a>b", "user_id": "u7", "conversation_id": "c1", "parent_id": "t3",
           "chosen_turn_id": "a", "rejected_turn_id": "b", "prompt": context,
           "chosen": [{"role": "assistant", "content": "A pear, certainly."}],
           "rejected": [{"role": "assistant", "content": "No."}], "weight": 0.5}
    pq.write_table(pa.Table.from_pylist([row], schema=PAIRS), tmp_path / "dpo.parquet")
    pairs = read_pairs(tmp_path / "dpo.parquet")
    assert pairs[0].key == "u7" and pairs[0].weight == 0.5
    tokenized, counts = tokenize_pairs(tokenizer, pairs, 256)
    scored = [tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])
              for e in (tokenized[0].chosen, tokenized[0].rejected)]
    assert scored == ["A pear, certainly.<|im_end|>", "No.<|im_end|>"]  # not "Hello there.", not the prompt
    assert counts.kept == 1


def test_bad_pairs_are_clear_errors_or_counted_skips(tmp_path, tiny, capsys):
    _, tokenizer = tiny
    path = tmp_path / "p.jsonl"

    def write(*rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    with pytest.raises(AlignloopError, match="no preference pairs"):
        read_pairs(write())
    with pytest.raises(AlignloopError, match=r"p.jsonl:1: expected an object with 'prompt', 'chosen'"):
        read_pairs(write({"prompt": "hi", "chosen": "a"}))
    with pytest.raises(AlignloopError, match="'rejected' must end with an assistant message"):
        read_pairs(write({"prompt": "hi", "chosen": "a", "rejected": [{"role": "user", "content": "x"}]}))
    same = {"prompt": "hi", "chosen": "same", "rejected": "same"}
    long = {"prompt": "hi", "chosen": "word " * 200, "rejected": "no"}
    ok = {"prompt": "hi", "chosen": "yes", "rejected": "no"}
    kept, counts = tokenize_pairs(tokenizer, read_pairs(write(same, long, ok)), 64)
    assert len(kept) == 1 and counts.skipped_identical == 1 and counts.skipped_too_long == 1
    assert "skipped 1 of 3 pair(s) with a side longer than max_seq_len=64" in capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(AlignloopError, match="no preference pair left"):
        tokenize_pairs(tokenizer, read_pairs(write(same, long)), 64)


def test_lora_reference_is_the_base_model(tiny):
    """The reference pass switches LoRA adapters off, even when they are no longer zero."""
    from alignloop.train.config import LoraSection
    from alignloop.train.logprobs import TokenLogprobs
    from alignloop.train.lora import add_lora

    model, tokenizer = tiny
    pairs, _ = tokenize_pairs(tokenizer, read_pairs(REPO / "recipes" / "data" / "dpo_demo.jsonl")[:3], 128)
    device = torch.device("cpu")
    base = dpo_module.compute_reference(TokenLogprobs(model), pairs, 2, 256, 0, device, bf16=False)
    import copy

    torch.manual_seed(0)
    lora = add_lora(copy.deepcopy(model), LoraSection(r=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    module = TokenLogprobs(lora)
    with_lora = dpo_module.compute_reference(module, pairs, 2, 256, 0, device, bf16=False)
    assert torch.allclose(base, with_lora, atol=1e-5)
    batch = PairBatches(pairs, 256, 2, shuffle=False)(0)[0]
    with torch.no_grad():
        assert not torch.allclose(dpo_module.sequence_logps(module, batch), base[:batch.n_pairs], atol=1e-3)


def test_per_sequence_attention_scores_each_side_as_if_alone(tiny):
    """Both sides of several pairs in one row, attention per sequence: each side's log-prob is
    what it gets alone in its own batch (and what the dense block mask gives)."""
    from alignloop.train.logprobs import TokenLogprobs

    model, tokenizer = tiny
    pairs, _ = tokenize_pairs(tokenizer, read_pairs(REPO / "recipes" / "data" / "dpo_demo.jsonl")[:3], 128)
    module = TokenLogprobs(model).eval()
    packed = collate_pairs([pairs])  # 3 pairs = 6 sequences in one row
    with torch.no_grad():
        together = dpo_module.sequence_logps(module, packed)
        pk = packed.packed
        dense = module(pk.input_ids, pk.position_ids, pk.attention_mask(), pk.loss_mask, pk.targets[pk.loss_mask])
        dense = torch.zeros(6).index_add_(0, packed.seq, dense).view(3, 2)
        alone = torch.cat([dpo_module.sequence_logps(module, collate_pairs([[p]])) for p in pairs])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-4)
    assert torch.allclose(together, dense, rtol=1e-5, atol=1e-4)


def test_run_refuses_bad_input_in_one_line(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DPORecipe
    from alignloop.train.stage import run_dpo

    base = [f"run.dir={tmp_path}", *FAST]
    with pytest.raises(AlignloopError, match="longer than the model's context of 4096"):
        run_dpo(load_recipe(TINY_RECIPE, DPORecipe, [*base, "train.max_seq_len=5000"]))
    # Every pair longer than max_seq_len: skipped and counted, then nothing left is an error.
    with pytest.raises(AlignloopError, match=r"no preference pair left to train on: 48 too long for max_seq_len=8"):
        run_dpo(load_recipe(TINY_RECIPE, DPORecipe, [*base, "train.max_seq_len=8"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AlignloopError, match="no preference pairs"):
        run_dpo(load_recipe(TINY_RECIPE, DPORecipe, [*base, f"data.path={empty}"]))


# --- whole runs --------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_run_learns_the_preference_and_reuses_cached_reference_after_resume(tmp_path, monkeypatch):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DPORecipe
    from alignloop.train.dpo import REFERENCE_FILE
    from alignloop.train.stage import run_dpo

    calls = []
    real = dpo_module._reference_forward
    monkeypatch.setattr(dpo_module, "_reference_forward", lambda m, b: (calls.append(b.n_pairs), real(m, b))[1])
    overrides = FAST + [f"run.dir={tmp_path}", "train.steps=8", "train.save_every=4", "train.eval_every=4"]
    recipe = load_recipe(TINY_RECIPE, DPORecipe, overrides)

    def die(step, metrics):
        if step == 6:
            raise _Stop  # killed between checkpoints 4 and 8

    with pytest.raises(_Stop):
        run_dpo(recipe, callbacks=[die])
    assert sum(calls) == 48 and len(calls) > 1  # one pass over every pair (train and eval), batched
    stage_dir = tmp_path / "dpo-tiny" / "dpo"
    cached = (stage_dir / REFERENCE_FILE).read_bytes()

    stage = run_dpo(recipe)
    assert sum(calls) == 48, "the reference ran again after resume"
    assert (stage_dir / REFERENCE_FILE).read_bytes() == cached
    manifest = json.loads(stage.path("manifest.json").read_text())
    assert manifest["train"]["resumed_from"] == 4 and manifest["train"]["steps"] == 8
    assert manifest["data"]["eval_pairs"] >= 8
    assert REFERENCE_FILE in manifest["outputs"] and "model/model.safetensors" in manifest["outputs"]

    metrics = [json.loads(line) for line in stage.path("metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert {"rewards/chosen", "rewards/rejected", "margin", "accuracy"} <= metrics[0].keys()
    assert metrics[0]["accuracy"] == 0.5 and metrics[0]["margin"] == pytest.approx(0, abs=1e-5)  # policy = reference
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [4, 8]
    assert evals[-1]["eval_accuracy"] >= 0.8 and evals[-1]["eval_margin"] > 0
    assert manifest["train"]["eval_accuracy"] == evals[-1]["eval_accuracy"]
    # The starting model (= the reference) on the same held-out pairs: ties by construction.
    baseline = manifest["baseline"]
    assert baseline["eval_accuracy"] == 0.5 and baseline["eval_pairs"] == manifest["data"]["eval_pairs"]
    assert evals[-1]["eval_logp_accuracy"] > baseline["eval_logp_accuracy"]


def test_simpo_runs_without_a_reference(tmp_path, monkeypatch):
    from alignloop.cli.train import app as train_app

    def forbidden(*args):
        raise AssertionError("SimPO must not run a reference model")

    monkeypatch.setattr(dpo_module, "_reference_forward", forbidden)
    result = CliRunner().invoke(train_app, ["dpo", str(TINY_RECIPE), "--set", f"run.dir={tmp_path}",
                                            "--set", "train.loss=simpo", "--set", "train.steps=3",
                                            "--set", "train.eval_every=0", *[x for o in FAST for x in ("--set", o)]])
    assert result.exit_code == 0, result.output
    stage_dir = tmp_path / "dpo-tiny" / "dpo"
    assert not (stage_dir / dpo_module.REFERENCE_FILE).exists()
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["config"]["train"]["beta"] == 2.0  # the SimPO default, recorded
    last = json.loads((stage_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_accuracy" in last and math.isfinite(last["loss"])


def _fake_pair(i: int) -> TokenizedPair:
    side = Example(input_ids=[1, 2, 3 + i], loss_mask=[0, 1, 1])
    return TokenizedPair(i, side, Example(input_ids=[1, 2, 9], loss_mask=[0, 1, 1]), 1.0, f"u{i}")


def test_limit_pairs_draws_a_seeded_subset_and_reindexes_for_the_reference_pass():
    train, held = [_fake_pair(i) for i in range(10)], [_fake_pair(i) for i in range(10, 14)]
    kept, t, e = limit_pairs(train, held, max_train=4, max_eval=None, seed=3)
    assert len(t) == 4 and len(e) == 4 and kept == t + e
    assert [p.index for p in kept] == list(range(8))          # reference rows 0..7, nothing else
    assert [p.key for p in e] == ["u10", "u11", "u12", "u13"]
    keys = [p.key for p in t]
    assert keys == sorted(keys, key=lambda k: int(k[1:]))      # file order kept
    assert limit_pairs(train, held, 4, None, seed=3)[1] == t   # same seed, same draw
    assert [p.key for p in limit_pairs(train, held, 4, None, seed=4)[1]] != keys
    kept, t, e = limit_pairs(train, held, None, 2, seed=0)
    assert len(t) == 10 and len(e) == 2
