"""`alignloop bench sft`: both sides do the same work with the same settings, TRL at its best.

No timing here: only that the work and the settings match (on the tiny model, so it is quick):
the same token ids, the same trained positions, the same tokens per step, no gradient
checkpointing on either side, the same LoRA, lr, clipping and precision.
"""

import pytest

from alignloop.bench.sft import (
    BATCH,
    LORA,
    MARKED_TEMPLATE,
    MAX_LENGTH,
    PEER_MICRO_BATCH,
    Ours,
    bench_conversations,
    bench_settings,
    same_examples,
)
from alignloop.bench.training import Side, step_rounds


def test_conversations_are_fixed_and_fit_the_rows():
    a, b = bench_conversations(32), bench_conversations(32)
    assert a == b  # deterministic
    assert bench_conversations(32, seed=1) != a
    assert all(m[-1]["role"] == "assistant" for m in a)
    assert {len(m) // 2 for m in bench_conversations()} == {1, 2, 3, 4}  # 1-4 turns


def test_the_marked_template_renders_the_same_text_and_marks_our_trained_tokens():
    from alignloop.chat.masks import mask_conversation
    from alignloop.models.zoo import load_tokenizer

    tokenizer = load_tokenizer("tiny", for_batching=True)
    for messages in bench_conversations(40):
        original = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=MARKED_TEMPLATE) == original
        marked = tokenizer.apply_chat_template(messages, chat_template=MARKED_TEMPLATE, return_dict=True,
                                               return_assistant_tokens_mask=True)
        ours = mask_conversation(tokenizer, messages)
        assert list(marked["input_ids"]) == ours.input_ids
        assert list(marked["assistant_masks"]) == ours.mask and any(ours.mask)


def test_same_examples_notices_a_different_token_or_trained_position():
    ours = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    assert same_examples(ours, list(reversed(ours))) == {"ids": True, "mask": True}
    assert same_examples(ours, [([1, 2, 3], [0, 0, 1]), ([4, 5], [0, 1])]) == {"ids": True, "mask": False}
    assert same_examples(ours, [([1, 2, 9], [0, 1, 1]), ([4, 5], [0, 1])])["ids"] is False


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    pytest.importorskip("trl")
    from alignloop.bench.sft import Peer

    work = tmp_path_factory.mktemp("bench-sft")
    conversations = bench_conversations(24)
    return Ours("tiny", conversations, work), Peer("tiny", conversations, work), conversations


def test_both_sides_train_the_same_tokens_at_the_same_positions(tiny, sides):
    ours, peer, conversations = sides
    # Every conversation kept whole on both sides (none skipped or truncated), the same ids and
    # the same trained (assistant) positions, through each side's own tokenization.
    assert ours.counts.kept == len(conversations) == len(peer.examples())
    assert same_examples(ours.examples(), peer.examples()) == {"ids": True, "mask": True}
    # The same packing: the same number of rows of at most MAX_LENGTH tokens, so the same tokens per step.
    ours_rows, peer_rows = ours.rows(), peer.rows()
    assert len(ours_rows) == len(peer_rows)
    assert sum(map(sum, ours_rows)) == sum(map(sum, peer_rows))
    assert max(map(sum, ours_rows)) <= MAX_LENGTH and max(map(sum, peer_rows)) <= MAX_LENGTH


def test_both_sides_have_the_same_settings_and_trl_runs_at_its_best(tiny, sides):
    ours, peer, _ = sides
    a, b = ours.describe(), peer.describe()
    shared = ("rows_per_step", "lr", "max_grad_norm", "bf16_autocast", "lora_r", "lora_alpha", "lora_dropout",
              "lora_layers", "trainable_params", "adapter_dtype", "base_dtype", "max_length", "gradient_checkpointing")
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    settings = bench_settings()
    assert a["rows_per_step"] == BATCH == settings["rows_per_step"] and a["lora_r"] == LORA["r"] == settings["lora"]["r"]
    # TRL forwards its rows one at a time and accumulates (its fastest way here: see the bench's docstring).
    assert (b["batch"], b["grad_accum"]) == (PEER_MICRO_BATCH, BATCH // PEER_MICRO_BATCH)
    assert (a["base_dtype"], a["adapter_dtype"]) == (settings["base_dtype"], settings["adapter_dtype"])
    # TRL at its best: packed, padding-free, assistant-only loss, no gradient checkpointing, fused AdamW.
    assert a["gradient_checkpointing"] is False and b["gradient_checkpointing"] is False
    assert b["packing"] and b["padding_free"] and b["assistant_only_loss"] and b["optim"] == "adamw_torch_fused"


def test_a_round_times_the_same_number_of_steps_on_each_side_and_counts_tokens(tiny, sides):
    ours, peer, _ = sides
    rounds = {name: step_rounds(side.run_steps, name, 1) for name, side in (("ours", ours), ("peer", peer))}
    results = {name: run() for name, run in rounds.items()}
    for name, r in results.items():
        assert r["steps"] == 1 and r["seconds"] > 0, name
        assert 0 < r["useful"] <= r["computed"] <= BATCH * MAX_LENGTH, name
    # TRL's padding-free batch has no padding: every computed token is a real one.
    assert results["peer"]["useful"] == results["peer"]["computed"]


def test_a_side_counts_nothing_before_its_warm_up_step():
    side = Side("x")
    side.add(10, 1.0, 12)
    side.add(20, 2.0, 24)
    assert side.result() == {"useful": 20, "computed": 24, "seconds": 2.0, "steps": 1}
