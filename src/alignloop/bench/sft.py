"""`alignloop bench sft`: supervised fine-tuning throughput, our trainer vs TRL's `SFTTrainer`.

Work: the same fixed set of chat conversations on both sides (generated deterministically from
the 64 bench prompts and seeded synthetic answers: 1-4 turns, ~50-250 tokens each), SmolLM2-135M,
LoRA r=16 / alpha 32 / no dropout on all linear layers, batch 4, bf16.

Metric: trained tokens per second, i.e. the non-pad tokens that go through forward and backward
per second of optimizer steps (data collation, forward, backward, clipping, AdamW). Each side is
timed over its own steps: ours from the loop's per-step clock, TRL's between its `on_step_begin`
and `on_step_end` callbacks; model loading, dataset preparation and logging are not timed. The
very first step of each side is a warm-up and not counted.

Parity, precision first. Both models are SmolLM2-135M loaded in bf16 (what TRL's default
`dtype="auto"` gives for the hub checkpoint, which is stored in bf16) with fp32 LoRA adapters (peft's
default), trained with bf16 autocast (TRL's default `bf16=True`). So every matmul is bf16 on both
sides, and neither re-casts fp32 base weights each forward. Ours is also timed with fp32 base
weights and no autocast, reported beside the headline (`ours_fp32`): on CPUs without AMX, bf16
matmuls may be no faster than fp32.

What differs, on purpose, is how each side trains, with TRL at its defaults:
- TRL: one conversation per row, padded to the longest of the batch (`packing=False`), gradient
  checkpointing on, loss on every token of the conversation (`assistant_only_loss=False`; SmolLM2's
  template has no generation markers to mask with), chunked fused LM head, entropy and accuracy
  metrics each step.
- ours: conversations packed into rows of up to 512 tokens, attention computed per conversation
  (no dense block mask; on CPU in fp32, which is faster there than bf16 and more exact), no
  gradient checkpointing, loss on assistant tokens only and the vocabulary projection computed
  only there, fused AdamW over the adapters.
Both: 4 rows per optimizer step, no gradient accumulation, lr 2e-5 (TRL's default), clipping at 1.0.

The machine may be shared with other work, so the two sides alternate in short rounds of about
equal step time (at least one step each), who goes first alternating too, and load that comes and
goes hits both alike. On an idle 2-core machine the whole bench takes about two minutes; a loaded
one stretches every step, and with it the bench.

Both sides run in this one process with the same torch thread count: torch's default less the
cores other processes keep busy (`bench_threads`). The JSON line also carries
what each side actually trained with (`ours_setup`, `peer_setup`: LoRA layers, trainable
parameters, base and adapter dtypes, batch, lr), and whether both tokenized the conversations to
the same ids (`same_token_ids`).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from alignloop.bench.prompts import bench_prompts
from alignloop.bench.training import (
    LORA,
    OurSide,
    Side,
    TrlPeer,
    alternate,
    answer,
    closing_facts,
    run_against_trl,
    table,
    trl_config,
    trl_version,
)
from alignloop.models import load_model
from alignloop.train.config import LoraSection, SFTTrainSection
from alignloop.train.sft import SFTObjective
from alignloop.train.sft_data import Conversation, PackedBatches, tokenize
from alignloop.ui import say

BATCH = 4             # rows per optimizer step, both sides
MAX_SEQ_LEN = 512     # our packed row length; every bench conversation fits (TRL's max_length stays 1024)
LR = 2e-5             # TRL's default learning rate, used on both sides (it does not change the speed)
N_CONVERSATIONS = 256
SEED = 0


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


def bench_settings() -> dict[str, Any]:
    """What both sides share (the unit test checks that each side's config says the same)."""
    return {"batch": BATCH, "grad_accum": 1, "lr": LR, "lora": dict(LORA), "max_grad_norm": 1.0,
            "bf16_autocast": True, "base_dtype": "bfloat16", "adapter_dtype": "float32"}


# --- our side -----------------------------------------------------------------------------------


def our_train_section(bf16: bool = True) -> SFTTrainSection:
    return SFTTrainSection(
        lr=LR, micro_batch=BATCH, grad_accum=1, max_grad_norm=1.0, bf16=bf16, max_seq_len=MAX_SEQ_LEN,
        lora=LoraSection(**LORA), schedule="constant", warmup_steps=0, steps=1_000_000,
        save_every=1_000_000_000, eval_every=0, eval_fraction=0.0, device="cpu", seed=SEED)


def peer_sft_config(output_dir: str | Path, max_steps: int = 1_000_000):
    """TRL's SFTConfig: its defaults, but for batch size, lr-independent step cap, and no checkpoints."""
    from trl import SFTConfig  # optional extra, checked by require_trl

    return trl_config(SFTConfig, output_dir, BATCH, LR, max_steps)


class Ours(OurSide):
    """Our SFT (TokenLogprobs + SFTObjective + PackedBatches + the shared loop), in rounds."""

    def __init__(self, model_name: str, conversations, workdir: Path, base_dtype: str, bf16: bool) -> None:
        model, tokenizer = load_model(model_name, dtype=base_dtype)
        examples, self.counts = tokenize(
            tokenizer, [Conversation(m, 1.0, f"bench:{i}") for i, m in enumerate(conversations)], MAX_SEQ_LEN)
        self.batches = PackedBatches(examples, MAX_SEQ_LEN, BATCH, seed=SEED, pad_id=tokenizer.pad_token_id or 0)
        super().__init__(model, our_train_section(bf16=bf16), workdir, SEED)

    def tokens_per_step(self) -> float:
        return sum(len(e) for e in self.batches.examples) / len(self.batches)

    def token_ids(self) -> list[list[int]]:
        return [list(e.input_ids) for e in self.batches.examples]

    def describe(self) -> dict[str, Any]:
        return self.setup(self.config.micro_batch)

    def run(self, side: Side, seconds: float) -> float:
        """Train until `seconds` of step time are spent (at least one step); return the time spent."""
        return self.train_round(SFTObjective(), self.batches, "sft", side, seconds)


class Peer(TrlPeer):
    """TRL's SFTTrainer with its defaults (see the module docstring), in rounds."""

    def __init__(self, model_name: str, conversations, workdir: Path) -> None:
        from trl import SFTTrainer  # optional extra, checked by require_trl

        super().__init__(SFTTrainer, model_name, lambda: peer_sft_config(workdir / "trl"),
                         [{"messages": m} for m in conversations], SEED)

    def tokens_per_step(self) -> float:
        lengths = [len(x) for x in self.trainer.train_dataset["input_ids"]]
        return sum(lengths) / -(-len(lengths) // BATCH)

    def token_ids(self) -> list[list[int]]:
        return [list(x) for x in self.trainer.train_dataset["input_ids"]]

    def describe(self) -> dict[str, Any]:
        return {**self.setup(), "packing": bool(self.trainer.args.packing)}


# --- the bench ----------------------------------------------------------------------------------


def run_bench(model: str = "smollm2-135m", rounds: int = 3, fp32: bool = True,
              n_conversations: int = N_CONVERSATIONS, threads: int | None = None) -> dict:
    """Time ours and TRL in alternating rounds; return the one-line summary (see module docstring).

    Each round: one step of ours, then TRL for as much step time as that step took (at least one
    step; TRL's steps are shorter), first the one then the other in turn; then, with `fp32`, one
    step of ours in fp32. The first step of each side is a warm-up. `threads`: torch threads for
    both sides (default `bench_threads()`).
    """
    return run_against_trl("sft", threads, lambda load: _run(model, rounds, fp32, n_conversations, load))


def _run(model: str, rounds: int, fp32: bool, n_conversations: int, load: float) -> dict:
    conversations = bench_conversations(n_conversations)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-sft-") as tmp:
        work = Path(tmp)
        say(f"bench sft: {model}, {len(conversations)} conversations, batch {BATCH}, LoRA r={LORA['r']}; "
            f"{rounds} alternating rounds, torch threads {torch.get_num_threads()}")
        ours = Ours(model, conversations, work, base_dtype="bfloat16", bf16=True)
        ours32 = Ours(model, conversations, work, base_dtype="float32", bf16=False) if fp32 else None
        peer = Peer(model, conversations, work)
        runners = {"ours": ours.run, "peer": peer.run}
        if ours32 is not None:
            runners["ours_fp32"] = ours32.run
        sides = alternate("sft", runners, rounds, extra=("ours_fp32",) if ours32 is not None else ())
        per_step = {"ours": ours.tokens_per_step(), "peer": peer.tokens_per_step()}
        counts, ours_setup, peer_setup = ours.counts, ours.describe(), peer.describe()
        same_tokens = sorted(ours.token_ids()) == sorted(peer.token_ids())

    line = {"bench": "sft", "ours": round(sides["ours"].tok_s, 1), "peer": round(sides["peer"].tok_s, 1),
            "unit": "trained tokens/s", "ratio": round(sides["ours"].tok_s / max(sides["peer"].tok_s, 1e-9), 2),
            "precision": "both: bf16 base weights, fp32 LoRA adapters, bf16 autocast"
                         " (ours computes CPU attention in fp32)",
            "ours_config": f"packed rows <= {MAX_SEQ_LEN} tokens, per-document attention, batch {BATCH}, "
                           f"loss and vocab projection on assistant tokens only, no grad checkpointing",
            "peer_config": f"trl {trl_version()} SFTTrainer defaults: padded rows, gradient checkpointing, "
                           f"loss on all tokens; batch {BATCH}",
            "model": model, "conversations": len(conversations), "same_token_ids": same_tokens,
            "assistant_token_share": round(counts.loss_tokens / counts.tokens, 2),
            "tokens_per_step": {k: round(v) for k, v in per_step.items()},
            **closing_facts(sides, ours_setup, peer_setup, load, started)}
    if "ours_fp32" in sides and sides["ours_fp32"].steps:
        line["ours_fp32"] = round(sides["ours_fp32"].tok_s, 1)
        line["ours_fp32_over_bf16"] = round(sides["ours_fp32"].tok_s / max(sides["ours"].tok_s, 1e-9), 2)
    table("bench sft", sides)
    return line
