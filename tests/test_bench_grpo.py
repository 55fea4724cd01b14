"""`alignloop bench grpo`: both sides do the same work with the same settings (tiny model, no timing)."""

import pytest

from alignloop.bench.grpo import (
    GENERATIONS,
    MAX_TOKENS,
    PROMPTS,
    Ours,
    bench_problems,
    bench_reward,
)


def test_problems_are_fixed_and_the_reward_has_spread():
    assert bench_problems() == bench_problems() and len(bench_problems()) == PROMPTS
    p = bench_problems()[0]
    right, wrong = bench_reward(f"So... Answer: {p.answer}", p.answer), bench_reward("no idea", p.answer)
    assert right > 1.0 > wrong >= 0
    assert bench_reward("a" * 50, p.answer) != bench_reward("a" * 60, p.answer)  # continuous: no flat groups


def test_both_sides_share_model_lora_batch_and_objective(tmp_path):
    pytest.importorskip("trl")
    from alignloop.bench.grpo import Peer

    ours, peer = Ours("tiny"), Peer("tiny", tmp_path)
    a, b = ours.describe(), peer.describe()
    shared = ("lr", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha", "lora_dropout", "lora_layers",
              "trainable_params", "adapter_dtype", "base_dtype", "completions_per_step", "max_new_tokens",
              "clip", "beta")
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    assert a["completions_per_step"] == PROMPTS * GENERATIONS and a["max_new_tokens"] == MAX_TOKENS
    assert b["loss"] == "dapo" and a["loss"].endswith("(dapo)")
    # One of our steps really generates 64 completions of at most 64 tokens and trains on them.
    step = ours.step()
    assert 0 < step["completion_tokens"] <= PROMPTS * GENERATIONS * MAX_TOKENS
    assert step["skipped"] == 0 and step["training"] > 0
