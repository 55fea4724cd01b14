"""`alignloop bench dpo`: both sides do the same work with the same settings, TRL at its best.

No timing here: only that the work and the settings match (on the tiny model, so it is quick):
the same token ids, the same scored positions (but for TRL's one stated extra), the reference
precomputed on both sides and never run inside a step, 4 pairs per step, no gradient
checkpointing, the same LoRA, lr, clipping, beta and precision.
"""

import pytest
import torch

from alignloop.bench.dpo import (
    BETA,
    LORA,
    PAIRS_PER_STEP,
    PEER_MICRO_BATCH,
    Ours,
    bench_pairs,
    bench_settings,
    one_epoch_rate,
    same_sequences,
)
from alignloop.bench.training import Side


def test_pairs_are_fixed_and_differ_between_sides():
    a, b = bench_pairs(16), bench_pairs(16)
    assert a == b  # deterministic
    assert bench_pairs(16, seed=1) != a
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in a)
    assert {len(p["prompt"]) for p in bench_pairs()} == {1, 3}  # one- and two-turn prompts


def test_same_sequences_allows_only_trls_final_token_extra():
    ours = [([1, 2, 3, 4], [0, 1, 1, 0])]
    assert same_sequences(ours, [([1, 2, 3, 4], [0, 1, 1, 1])]) == {"ids": True, "mask": True}
    assert same_sequences(ours, [([1, 2, 3, 4], [0, 0, 1, 1])])["mask"] is False
    assert same_sequences(ours, [([1, 2, 3, 4], [0, 1, 1, 0])])["mask"] is False
    assert same_sequences(ours, [([1, 2, 3, 5], [0, 1, 1, 1])]) == {"ids": False, "mask": False}


def test_one_epoch_rate_charges_the_reference_pass():
    assert one_epoch_rate(100.0, 100.0) == 50.0
    assert one_epoch_rate(100.0, 0.0) == 0.0


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    pytest.importorskip("trl")
    from alignloop.bench.dpo import Peer

    work = tmp_path_factory.mktemp("bench-dpo")
    pairs = bench_pairs(10)
    return Ours("tiny", pairs, work), Peer("tiny", pairs, work), pairs


def test_both_sides_score_the_same_pairs_with_the_same_settings(tiny, sides):
    ours, peer, pairs = sides
    # The same token ids, sequence by sequence (prompt + chosen, prompt + rejected, both through
    # the model's chat template), none skipped or truncated on either side.
    assert ours.counts.kept == len(pairs) == len(peer.trainer.train_dataset)
    assert same_sequences(ours.sequences(), peer.sequences()) == {"ids": True, "mask": True}
    assert ours.pair_tokens() == peer.pair_tokens()

    a, b = ours.describe(), peer.describe()
    shared = ("pairs_per_step", "lr", "beta", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha",
              "lora_dropout", "lora_layers", "trainable_params", "adapter_dtype", "base_dtype",
              "gradient_checkpointing", "precompute_reference", "loss_type")
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    settings = bench_settings()
    assert a["pairs_per_step"] == PAIRS_PER_STEP == settings["pairs_per_step"]
    assert a["lora_r"] == LORA["r"] == settings["lora"]["r"]
    assert (b["batch"], b["grad_accum"]) == (PEER_MICRO_BATCH, PAIRS_PER_STEP // PEER_MICRO_BATCH)
    assert a["beta"] == BETA and (a["base_dtype"], a["adapter_dtype"]) == (settings["base_dtype"], "float32")
    # TRL at its best: reference precomputed (in its constructor, timed), no gradient checkpointing.
    assert b["precompute_reference"] and b["gradient_checkpointing"] is False and b["loss_type"] == ["sigmoid"]
    assert peer.trainer.precompute_seconds > 0 and peer.trainer.precompute_tokens >= peer.pair_tokens()
    assert "ref_chosen_logps" in peer.trainer.train_dataset.column_names


def test_neither_side_runs_the_reference_inside_a_step(tiny, sides, monkeypatch):
    from alignloop.train import dpo as dpo_module

    ours, peer, pairs = sides
    calls = []
    real = dpo_module._reference_forward
    monkeypatch.setattr(dpo_module, "_reference_forward", lambda m, batch: (calls.append(batch.n_pairs),
                                                                              real(m, batch))[1])
    ours.compute_reference()
    assert sum(calls) == len(pairs)
    batches = ours.batches(0)
    assert [batches[i].n_pairs for i in range(len(batches))] == [4, 4, 2]
    assert batches[0].packed.input_ids.shape[0] == 1  # the step's pairs share one row, no padding
    side = Side("ours", warm=True)
    ours.run_steps(side, 2)
    assert sum(calls) == len(pairs) and len(side.steps) == 2
    tokens, seconds = side.steps[0]
    assert tokens > 0 and seconds > 0 and side.computed[0] >= tokens

    # TRL: its reference log-probs come from the dataset; every forward of a step trains (a
    # reference forward would run under no_grad).
    forwards = []
    hook = peer.trainer.model.register_forward_pre_hook(lambda m, a: forwards.append(torch.is_grad_enabled()))
    try:
        side = Side("peer", warm=True)
        peer.run_steps(side, 2)
    finally:
        hook.remove()
    assert forwards == [True] * (2 * PAIRS_PER_STEP // PEER_MICRO_BATCH) and len(side.steps) == 2
    (tokens, _), computed = side.steps[0], side.computed[0]
    assert 0 < tokens <= computed  # padded: computed counts the pad slots too
