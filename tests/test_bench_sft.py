"""`alignloop bench sft`: both sides train the same tokens with the same LoRA, precision and batch.

No timing here: only that the work and the settings match (on the tiny model, so it is quick).
"""


import pytest

from alignloop.bench.sft import (
    BATCH,
    LORA,
    MAX_SEQ_LEN,
    Ours,
    bench_conversations,
    bench_settings,
)


def test_conversations_are_fixed_and_fit_our_rows(tiny):
    a, b = bench_conversations(32), bench_conversations(32)
    assert a == b  # deterministic
    assert bench_conversations(32, seed=1) != a
    assert all(m[-1]["role"] == "assistant" for m in a)
    assert {len(m) // 2 for m in bench_conversations()} == {1, 2, 3, 4}  # 1-4 turns


def test_both_sides_train_the_same_tokens_with_the_same_settings(tiny, tmp_path):
    pytest.importorskip("trl")
    from alignloop.bench.sft import Peer

    conversations = bench_conversations(24)
    ours = Ours("tiny", conversations, tmp_path, base_dtype="bfloat16", bf16=True)
    peer = Peer("tiny", conversations, tmp_path)

    # The same token ids, conversation by conversation (both through the model's chat template),
    # none skipped or truncated on either side.
    assert ours.counts.kept == len(conversations)
    assert sorted(ours.token_ids()) == sorted(peer.token_ids())
    assert max(len(t) for t in ours.token_ids()) <= MAX_SEQ_LEN

    a, b = ours.describe(), peer.describe()
    shared = ("batch", "grad_accum", "lr", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha",
              "lora_dropout", "lora_layers", "trainable_params", "adapter_dtype", "base_dtype")
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    settings = bench_settings()
    assert a["batch"] == BATCH == settings["batch"] and a["lora_r"] == LORA["r"] == settings["lora"]["r"]
    assert (a["base_dtype"], a["adapter_dtype"]) == (settings["base_dtype"], settings["adapter_dtype"])
    # TRL keeps its own defaults for how it trains (documented in the bench's JSON line).
    assert b["gradient_checkpointing"] and not b["packing"]


def test_bench_threads_leave_out_the_cores_other_work_keeps_busy(monkeypatch):
    import os

    import torch

    from alignloop.bench import training

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for load, threads in ((0.0, 8), (0.4, 8), (0.6, 7), (3.2, 5), (7.6, 1), (40.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert training.bench_threads() == threads, load
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # never more than torch would use
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert training.bench_threads() == 2
