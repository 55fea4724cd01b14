"""`alignloop bench dpo`: both sides train the same pairs with the same LoRA, precision and batch.

No timing here: only that the work and the settings match, and that our side really trains 4
pairs per step from a reference computed once (on the tiny model, so it is quick).
"""

import pytest

from alignloop.bench.dpo import (
    BETA,
    LORA,
    PAIRS_PER_STEP,
    Ours,
    bench_pairs,
    bench_settings,
)
from alignloop.bench.training import Side


def test_pairs_are_fixed_and_differ_between_sides():
    a, b = bench_pairs(16), bench_pairs(16)
    assert a == b  # deterministic
    assert bench_pairs(16, seed=1) != a
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in a)
    assert {len(p["prompt"]) for p in bench_pairs()} == {1, 3}  # one- and two-turn prompts


def test_both_sides_train_the_same_pairs_with_the_same_settings(tiny, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from alignloop.bench.dpo import Peer
    from alignloop.train import dpo as dpo_module

    pairs = bench_pairs(10)
    ours = Ours("tiny", pairs, tmp_path)
    peer = Peer("tiny", pairs, tmp_path)

    # The same token ids, sequence by sequence (prompt + chosen, prompt + rejected, both through
    # the model's chat template), none skipped or truncated on either side.
    assert ours.counts.kept == len(pairs) == len(peer.trainer.train_dataset)
    assert sorted(ours.token_ids()) == sorted(peer.token_ids())
    assert ours.pair_tokens() == peer.pair_tokens()

    a, b = ours.describe(), peer.describe()
    shared = ("batch", "grad_accum", "lr", "beta", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha",
              "lora_dropout", "lora_layers", "trainable_params", "adapter_dtype", "base_dtype")
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    settings = bench_settings()
    assert a["batch"] == PAIRS_PER_STEP == settings["batch"] and a["lora_r"] == LORA["r"] == settings["lora"]["r"]
    assert a["beta"] == BETA and (a["base_dtype"], a["adapter_dtype"]) == (settings["base_dtype"], "float32")
    # TRL keeps its own defaults for how it trains (documented in the bench's JSON line).
    assert b["gradient_checkpointing"] and not b["precompute_ref_log_probs"] and b["loss_type"] == ["sigmoid"]

    # Ours: the reference once over all pairs, then steps of exactly 4 pairs that never call it.
    calls = []
    real = dpo_module._reference_forward
    monkeypatch.setattr(dpo_module, "_reference_forward", lambda m, batch: (calls.append(batch.n_pairs),
                                                                              real(m, batch))[1])
    ours.compute_reference()
    assert sum(calls) == len(pairs)
    batches = ours.batches(0)
    assert [batches[i].n_pairs for i in range(len(batches))] == [4, 4, 2]
    assert batches[0].packed.input_ids.shape[0] == 1  # the step's pairs share one row, no padding
    side = Side("ours")
    ours.run(side, 0.0)  # warm-up step
    ours.run(side, 0.0)
    assert sum(calls) == len(pairs) and len(side.steps) == 1
    tokens, seconds = side.steps[0]
    assert tokens > 0 and seconds > 0
