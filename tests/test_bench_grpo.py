"""`alignloop bench grpo`: both sides do the same work with the same settings (tiny model, no timing)."""

import importlib.util

import pytest

from alignloop.bench import grpo
from alignloop.bench.grpo import (
    GENERATIONS,
    PROMPTS,
    Ours,
    bench_problems,
    bench_reward,
    objective,
    peer_settings,
    sampling,
    seconds_summary,
)
from alignloop.errors import AlignloopError

# What both sides' describe() must agree on: the model's LoRA, the batch, generation and the objective.
SHARED = ("lr", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha", "lora_dropout", "lora_layers",
          "trainable_params", "adapter_dtype", "base_dtype", "temperature", "top_p", "top_k", "max_new_tokens",
          "loss", "clip", "beta", "iterations", "scale_rewards", "lr_schedule", "completions_per_step",
          "generations_per_prompt", "micro_batch", "gradient_checkpointing", "stop_ids")


def test_problems_are_fixed_and_the_reward_has_spread():
    assert bench_problems() == bench_problems() and len(bench_problems()) == PROMPTS
    p = bench_problems()[0]
    right, wrong = bench_reward(f"So... Answer: {p.answer}", p.answer), bench_reward("no idea", p.answer)
    assert right > 1.0 > wrong >= 0
    assert bench_reward("a" * 50, p.answer) != bench_reward("a" * 60, p.answer)  # continuous: no flat groups


@pytest.mark.parametrize("generation", ["generate", "static", "cb", "vllm"])
def test_trl_settings_are_the_shared_work_with_checkpointing_and_logging_off(generation):
    s, o = peer_settings(generation), objective()
    assert s["gradient_checkpointing"] is False and s["bf16"] is False  # fp32 unless asked, as ours
    assert (s["temperature"], s["top_p"], s["top_k"], s["max_completion_length"]) == tuple(sampling().values())
    assert s["per_device_train_batch_size"] * s["gradient_accumulation_steps"] == PROMPTS * GENERATIONS
    assert s["per_device_train_batch_size"] == o["micro_batch"] == grpo.rl_section().micro_batch
    assert s["num_generations"] == GENERATIONS and s["num_iterations"] == 1 and s["beta"] == 0.0
    assert [s["epsilon"], s["epsilon_high"]] == o["clip"] and s["loss_type"] == "dapo"
    assert s["learning_rate"] == o["lr"] and s["lr_scheduler_type"] == "constant"
    assert s["logging_steps"] > 1000 and s["log_completions"] is False
    assert s.get("use_vllm", False) == (generation == "vllm")
    assert s.get("use_transformers_continuous_batching", False) == (generation == "cb")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_sides_take_the_same_precision(dtype):
    assert peer_settings("generate", dtype)["bf16"] == grpo.rl_section(dtype).bf16 == (dtype == "bfloat16")


def test_user_errors_are_one_line():
    with pytest.raises(AlignloopError, match="generation path"):
        peer_settings("beam")
    with pytest.raises(AlignloopError, match="dtype"):
        grpo.run_bench(dtype="float16")


def test_vllm_that_does_not_import_is_said_so(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert grpo.vllm_problem() == "not importable here"


def test_seconds_summary_and_ratio_direction():
    s = seconds_summary([{"seconds": 4.0}, {"seconds": 2.0}, {"seconds": 3.0}])
    assert s == {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 3}


def test_both_sides_share_model_lora_batch_generation_and_objective(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from alignloop.bench.grpo import Peer

    monkeypatch.setattr(grpo, "MAX_TOKENS", 6)  # short replies: the test is about parity, not speed
    ours, peer = Ours("tiny"), Peer("tiny", tmp_path, "generate")
    a, b = ours.describe(), peer.describe()
    assert {k: a[k] for k in SHARED} == {k: b[k] for k in SHARED}
    assert a["gradient_checkpointing"] is False and b["gradient_checkpointing"] is False
    assert a["completions_per_step"] == PROMPTS * GENERATIONS and a["max_new_tokens"] == 6
    assert b["generation_batch"] == PROMPTS * GENERATIONS  # all 64 generated at once, as ours
    assert a["loss"] == "dapo" and a["clip"] == [0.2, 0.2] and a["beta"] == 0.0
    assert ours.prompt_ids() == peer.prompt_ids()  # the same prompts, token for token

    # One step of each really generates 64 completions of at most 6 tokens and trains on all of them.
    for side in (ours.step(), peer.step()):
        t = side["tokens"]
        assert 0 < t["generated"] <= PROMPTS * GENERATIONS * 6 and side["useful"] == t["generated"]
        # every completion is trained on, but those our trainer skips exactly (advantage 0, no KL term)
        assert t["trained"] == t["generated"] or side.get("skipped")
        assert t["generated"] <= t["generation_slots"] <= PROMPTS * GENERATIONS * 6
        assert t["training_positions"] > t["trained"]
        assert side["split"]["generation"] > 0 and side["split"]["training"] > 0
        assert sum(side["split"].values()) <= side["seconds"] * 1.05
