"""`alignloop bench sft`: supervised fine-tuning throughput, our trainer vs TRL's `SFTTrainer` at its best.

Work, the same on both sides: a fixed set of 256 chat conversations (from the 64 bench prompts
and seeded synthetic answers: 1-4 turns, ~50-250 tokens each), rendered with SmolLM2's chat
template to the same token ids, packed into rows of up to 512 tokens (conversations whole, each
attending only to itself, positions restarting at 0), 4 rows per optimizer step; the loss on the
assistant tokens only (content and end-of-turn, the same positions on both sides), SmolLM2-135M
with LoRA r=16 / alpha 32 / no dropout on all linear layers, AdamW (fused), lr 2e-5 constant,
clipping at 1.0, no gradient checkpointing. Precision: bf16 base weights (as the checkpoint is
stored), fp32 adapters (peft's default), bf16 autocast (TRL's default `bf16=True`);
`--dtype float32` runs both sides with fp32 weights and no autocast instead (on this AVX512-BF16
CPU without AMX, bf16 matmuls measured ~2x faster than fp32, so bf16 is the headline).

Metric: trained tokens per second, i.e. the conversation tokens (not padding) that go through
forward and backward, per second of optimizer steps. Ours is timed by the loop's own per-step
clock (collation, forward, backward, clipping, AdamW); TRL's between its `on_step_begin` and
`on_step_end` callbacks (forward, backward, clipping, AdamW; its data loader collates the step's
batches before `on_step_begin`, so TRL's collation is not timed). Model loading, tokenization,
packing and logging are timed on neither side. Rounds: every side first trains `steps` untimed
steps (warm-up), then `rounds` >= 3 rounds of `steps` steps each, the order flipping every round,
both sides timed on the same number of steps; the line reports the median and min/max per side,
and each side's tokens per step: `useful` (conversation tokens) and `computed` (+ padding).

TRL, configured as its docs recommend for speed (`SFTConfig`, `peer_settings`): `packing=True`
(strategy "bfd", its default: best-fit decreasing, whole conversations) with `max_length=512`,
which makes it padding-free (`padding_free=True`, said outright): a forward's rows go through the
model as one flattened sequence with position ids restarting per conversation, no pad token;
`assistant_only_loss=True`, with SmolLM2's template given `{% generation %}` markers
(`MARKED_TEMPLATE`: byte-identical text, tested); `gradient_checkpointing=False` (TRL defaults
to True, which recomputes every layer's forward in the backward); `lr_scheduler_type="constant"`
as ours (no effect on speed); the rest at TRL's defaults (fused AdamW, its fused LM head, bf16
autocast, sdpa attention). One more setting, for CPU: one packed row per forward, 4 accumulated
per step (`per_device_train_batch_size=1`, `gradient_accumulation_steps=4`), the same 4 rows per
step. Padding-free assumes FlashAttention; on CPU transformers runs sdpa over the whole flattened
forward with a dense block-diagonal mask, so 4 rows in one forward cost (4 x 512)^2 query-key
pairs, against 4 x 512^2 for one row per forward. Measured here (1 thread, CPU seconds per step): 28.5 with 4 rows per
forward, 19.8 with 1. (`flex_attention`, which would skip the masked blocks, has no backward on
CPU in torch 2.13.)

What differs, and cannot be set alike:
- LoRA: both train the same peft adapters; ours runs them through its own forward
  (`alignloop.train.lora_forward`: the scale folded into B, the add into the matmul, no
  bf16 -> fp32 -> bf16 round trip of each adapter's input under autocast), TRL through peft's.
- attention: TRL's row of ~500 tokens attends as one dense masked block (every query-key pair of
  the row computed, most masked away); ours runs attention per conversation
  (`segment_attention`), in fp32 on CPU. Both are exact; `attention_pairs_per_step` counts the
  pairs each computes.
- the LM head: TRL's fused head projects every position of the row on CPU (it projects only the
  labelled ones on Triton devices) and computes each position's entropy and top-1 match for its
  `entropy` / `mean_token_accuracy` metrics, every step; no setting turns that off. Ours projects
  only the trained positions and computes their label log-probs.
- padding: ours pads its 4 rows to the longest of the step (a few tokens, counted in `computed`);
  TRL's flattened rows have none.
- packing: ours packs first-fit decreasing, TRL best-fit decreasing; both give the same number of
  rows of the same tokens (`packing` per side).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from alignloop.bench.harness import alternate_rounds, headline, machine_facts, summary
from alignloop.bench.prompts import bench_prompts
from alignloop.bench.training import (
    LORA,
    OurSide,
    Side,
    TrlPeer,
    answer,
    check_dtype,
    load_average,
    run_against_trl,
    step_rounds,
    tokens_per_step,
    enum_value,
    trl_config,
    trl_version,
)
from alignloop.models import load_model
from alignloop.train.config import LoraSection, SFTTrainSection
from alignloop.train.sft import SFTObjective
from alignloop.train.sft_data import Conversation, PackedBatches, tokenize
from alignloop.ui import say

BATCH = 4             # packed rows per optimizer step, both sides
PEER_MICRO_BATCH = 1  # packed rows per TRL forward (x 4 accumulated): see the module docstring
MAX_LENGTH = 512      # tokens per packed row, both sides; every bench conversation fits
LR = 2e-5             # TRL's default learning rate, used on both sides (it does not change the speed)
N_CONVERSATIONS = 256
STEPS = 2             # optimizer steps per round, both sides
SEED = 0

# SmolLM2-135M-Instruct's chat template with `{% generation %}` around what the assistant writes
# (its content and the `<|im_end|>` that closes its turn), which TRL's `assistant_only_loss` needs.
# It renders the same text as the original, byte for byte (tests check it on every conversation).
MARKED_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --- the work ------------------------------------------------------------------------------------


def bench_conversations(n: int = N_CONVERSATIONS, seed: int = SEED) -> list[list[dict[str, str]]]:
    """n chat conversations, the same on every call: 1-4 turns of a bench prompt and an answer."""
    prompts = bench_prompts()
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages: list[dict[str, str]] = []
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
            messages.append({"role": "user", "content": rng.choice(prompts)})
            messages.append({"role": "assistant", "content": answer(rng, rng.randint(12, 70))})
        conversations.append(messages)
    return conversations


def bench_settings(dtype: str = "bfloat16") -> dict[str, Any]:
    """What both sides share (the unit test checks that each side's config says the same)."""
    return {"rows_per_step": BATCH, "lr": LR, "lora": dict(LORA), "max_grad_norm": 1.0,
            "max_length": MAX_LENGTH, "bf16_autocast": dtype == "bfloat16", "base_dtype": dtype,
            "adapter_dtype": "float32", "gradient_checkpointing": False}


def attention_pairs(lengths: list[int]) -> int:
    """Query-key pairs a causal attention over documents of these lengths computes (i attends j <= i)."""
    return sum(n * (n + 1) // 2 for n in lengths)


# --- our side -----------------------------------------------------------------------------------


def our_train_section(bf16: bool = True) -> SFTTrainSection:
    return SFTTrainSection(
        lr=LR, micro_batch=BATCH, grad_accum=1, max_grad_norm=1.0, bf16=bf16, max_seq_len=MAX_LENGTH,
        lora=LoraSection(**LORA), schedule="constant", warmup_steps=0, steps=1_000_000,
        save_every=1_000_000_000, eval_every=0, eval_fraction=0.0, device="cpu", seed=SEED)


class Ours(OurSide):
    """Our SFT (TokenLogprobs + SFTObjective + PackedBatches + the shared loop), in rounds."""

    def __init__(self, model_name: str, conversations, workdir: Path, dtype: str = "bfloat16") -> None:
        model, tokenizer = load_model(model_name, dtype=dtype)
        examples, self.counts = tokenize(
            tokenizer, [Conversation(m, 1.0, f"bench:{i}") for i, m in enumerate(conversations)], MAX_LENGTH)
        self.batches = PackedBatches(examples, MAX_LENGTH, BATCH, seed=SEED, pad_id=tokenizer.pad_token_id or 0)
        super().__init__(model, our_train_section(bf16=dtype == "bfloat16"), workdir, SEED)

    def rows(self) -> list[list[int]]:
        """The packed rows: each a list of conversation lengths."""
        return [[len(self.batches.examples[i]) for i in row] for row in self.batches.rows]

    def examples(self) -> list[tuple[list[int], list[int]]]:
        """(token ids, loss mask) of every conversation; mask[j] = 1: token j is trained on."""
        return [(list(e.input_ids), list(e.loss_mask)) for e in self.batches.examples]

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**self.setup(c.micro_batch), "rows_per_step": c.micro_batch * c.grad_accum, "max_length": MAX_LENGTH,
                "gradient_checkpointing": False}

    def run(self, side: Side, seconds: float) -> float:
        return self.train_round(SFTObjective(), self.batches, "sft", side, seconds)

    def run_steps(self, side: Side, steps: int) -> None:
        self.train_round(SFTObjective(), self.batches, "sft", side, 0.0, steps=steps)


# --- TRL's side ---------------------------------------------------------------------------------


def peer_settings() -> dict[str, Any]:
    """The `SFTConfig` settings the bench sets beyond batch, lr, step cap and output (see the docstring)."""
    return {"packing": True, "packing_strategy": "bfd", "padding_free": True, "max_length": MAX_LENGTH,
            "assistant_only_loss": True, "gradient_checkpointing": False, "lr_scheduler_type": "constant",
            "disable_tqdm": True}


def peer_sft_config(output_dir: str | Path, dtype: str = "bfloat16", micro_batch: int = PEER_MICRO_BATCH,
                    max_steps: int = 1_000_000):
    """TRL's SFTConfig at its best for this work (`peer_settings`, `micro_batch` rows per forward,
    BATCH rows per step), else its defaults."""
    from trl import SFTConfig  # optional extra, checked by require_trl

    return trl_config(SFTConfig, output_dir, micro_batch, LR, max_steps, grad_accum=BATCH // micro_batch,
                      bf16=dtype == "bfloat16", **peer_settings())


class Peer(TrlPeer):
    """TRL's SFTTrainer, packed, padding-free, assistant-only loss, no checkpointing, in rounds."""

    def __init__(self, model_name: str, conversations, workdir: Path, dtype: str = "bfloat16",
                 micro_batch: int = PEER_MICRO_BATCH) -> None:
        from trl import SFTTrainer  # optional extra, checked by require_trl

        if BATCH % micro_batch:
            raise ValueError(f"micro_batch {micro_batch} does not divide the {BATCH} rows of a step")
        super().__init__(SFTTrainer, model_name, lambda: peer_sft_config(workdir / "trl", dtype, micro_batch),
                         [{"messages": m} for m in conversations], SEED, dtype=dtype, chat_template=MARKED_TEMPLATE)

    def rows(self) -> list[list[int]]:
        return [list(x) for x in self.trainer.train_dataset["seq_lengths"]]

    def examples(self) -> list[tuple[list[int], list[int]]]:
        """(token ids, loss mask) of every conversation, cut out of TRL's packed rows."""
        d = self.trainer.train_dataset
        out = []
        for ids, labels, lengths in zip(d["input_ids"], d["labels"], d["seq_lengths"]):
            at = 0
            for n in lengths:
                out.append((list(ids[at:at + n]), [int(label != -100) for label in labels[at:at + n]]))
                at += n
        return out

    def describe(self) -> dict[str, Any]:
        a = self.trainer.args
        return {**self.setup(), "rows_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
                "max_length": a.max_length, "packing": bool(a.packing),
                "packing_strategy": a.packing_strategy, "padding_free": bool(self.trainer.padding_free),
                "assistant_only_loss": bool(a.assistant_only_loss), "optim": enum_value(a.optim),
                "lr_scheduler_type": enum_value(a.lr_scheduler_type),
                "attn_implementation": self.trainer.model.config._attn_implementation}


# --- the bench ----------------------------------------------------------------------------------


def run_bench(model: str = "smollm2-135m", rounds: int = 3, steps: int = STEPS, dtype: str = "bfloat16",
              n_conversations: int = N_CONVERSATIONS, threads: int | None = None) -> dict:
    """Warm-up, then `rounds` alternating rounds of `steps` steps per side; the one-line summary."""
    check_dtype(dtype)
    return run_against_trl("sft", threads, lambda load: _run(model, rounds, steps, dtype, n_conversations, load))


def _run(model: str, rounds: int, steps: int, dtype: str, n_conversations: int, load: float) -> dict:
    conversations = bench_conversations(n_conversations)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-sft-") as tmp:
        work = Path(tmp)
        say(f"bench sft: {model} ({dtype}), {len(conversations)} conversations, {BATCH} rows of <= {MAX_LENGTH} "
            f"tokens per step, LoRA r={LORA['r']}; warm-up + {rounds} alternating rounds of {steps} steps, "
            f"torch threads {threads}")
        ours = Ours(model, conversations, work, dtype)
        peer = Peer(model, conversations, work, dtype)
        configs = {"ours": step_rounds(ours.run_steps, "ours", steps),
                   "peer": step_rounds(peer.run_steps, "peer", steps)}
        results = alternate_rounds(configs, rounds=rounds, label="bench sft")
        ours_setup, peer_setup = ours.describe(), peer.describe()
        same_work = same_examples(ours.examples(), peer.examples())
        rows = {"ours": ours.rows(), "peer": peer.rows()}

    per_step = tokens_per_step(results)
    epoch = {side: {"rows": len(r), "tokens": sum(map(sum, r)),
                    "tokens_per_step": round(sum(map(sum, r)) / -(-len(r) // BATCH))} for side, r in rows.items()}
    return headline(
        "sft", summary(results["ours"]), summary(results["peer"]), "trained tokens/s",
        ours_config=f"alignloop: {BATCH} packed rows <= {MAX_LENGTH} tokens, per-conversation attention, "
                    f"assistant-only loss, vocab projection at trained positions, no grad checkpointing, {dtype}",
        peer_config=f"trl {trl_version()} SFTTrainer: packing (bfd) + padding_free, max_length {MAX_LENGTH}, "
                    f"assistant_only_loss, gradient_checkpointing off, {PEER_MICRO_BATCH} row(s) per forward x "
                    f"{BATCH // PEER_MICRO_BATCH} accumulated, {dtype}",
        machine=machine_facts(threads, peers=("trl", "transformers", "peft")),
        dtype=dtype, steps_per_round=steps,
        tokens_per_step=per_step,  # measured in the timed rounds: useful = conversation tokens, computed = + padding
        packing=epoch,             # one epoch of each side's packed rows
        attention_pairs_per_step={"ours": round(sum(attention_pairs(r) for r in rows["ours"]) / len(rows["ours"])
                                                * BATCH),
                                  "peer": round(sum(sum(r) ** 2 for r in chunks(rows["peer"], PEER_MICRO_BATCH))
                                                / len(rows["peer"]) * BATCH)},
        same_token_ids=same_work["ids"], same_loss_mask=same_work["mask"],
        assistant_token_share=round(ours.counts.loss_tokens / ours.counts.tokens, 2),
        ours_setup=ours_setup, peer_setup=peer_setup,
        peer_settings={**peer_settings(), "per_device_train_batch_size": PEER_MICRO_BATCH,
                       "gradient_accumulation_steps": BATCH // PEER_MICRO_BATCH, "bf16": dtype == "bfloat16"},
        load_at_start=round(load, 2), load_at_end=round(load_average(), 2),
        seconds=round(time.perf_counter() - started, 1))


def same_examples(ours: list[tuple[list[int], list[int]]], peer: list[tuple[list[int], list[int]]]) -> dict[str, bool]:
    """Whether both sides hold the same conversations (token ids) with the same trained positions."""
    ours_sorted, peer_sorted = sorted(ours), sorted(peer)
    return {"ids": [i for i, _ in ours_sorted] == [i for i, _ in peer_sorted],
            "mask": [m for _, m in ours_sorted] == [m for _, m in peer_sorted]}


def chunks(rows: list[list[int]], n: int) -> list[list[int]]:
    """Consecutive groups of n rows, each flattened into one list of document lengths."""
    return [[x for row in rows[i:i + n] for x in row] for i in range(0, len(rows), n)]
