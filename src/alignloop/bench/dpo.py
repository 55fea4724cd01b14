"""`alignloop bench dpo`: preference-optimisation throughput, our DPO trainer vs TRL's `DPOTrainer`.

Work: the same fixed set of preference pairs on both sides, generated deterministically from the
64 bench prompts: a prompt of one or two user turns (with an assistant answer between them) and
two different seeded synthetic answers as the chosen and the rejected response (12-70 words
each). SmolLM2-135M, LoRA r=16 / alpha 32 / no dropout on all linear layers, 4 pairs per
optimizer step, bf16, sigmoid DPO loss with beta 0.1, lr 1e-6 (TRL's defaults for the last two).

Metric: trained pair tokens per second, i.e. the non-pad tokens of both sides of every pair
(prompt + chosen, prompt + rejected: what a DPO step must score) that go through the training
forward and backward, per second of optimizer steps (data collation, every forward (the
reference's too, on TRL's side), backward, clipping, AdamW). Ours is timed by the loop's
per-step clock, TRL's between its `on_step_begin` and `on_step_end` callbacks; model loading and
dataset preparation are not timed. The first step of each side is a warm-up and not counted.

Parity: both models are SmolLM2-135M in bf16 with fp32 LoRA adapters (peft's default), trained
under bf16 autocast (TRL's default `bf16=True`); 4 pairs per step, no accumulation, clipping at
1.0. The reference is the base model with the adapters disabled on both sides.

What differs, on purpose, is how each side trains, with TRL at its defaults:
- TRL: chosen and rejected concatenated into one batch of 8 rows padded to the longest
  (`padding_free=False`), the reference's log-probs computed by a second (no-grad) forward with
  the adapters disabled *in every step* (`precompute_ref_log_probs=False`), gradient
  checkpointing on, a chunked fused LM head over all positions.
- ours: the reference log-probs of every pair computed once before training (a batched no-grad
  pass with the adapters disabled, as `alignloop train dpo` does, where they are also cached on
  disk) and looked up per step; the step's 4 pairs (8 sequences) packed into one row, attention
  per sequence (no padding, no dense mask), no gradient checkpointing, the vocabulary projection
  only at response tokens, fused AdamW over the adapters.

Since ours moves the reference pass out of the step, the JSON line also reports that pass
(`ours_reference_pass`: seconds and pair tokens/s) and ours with the pass charged to one epoch
of training (`ours_with_reference_pass`: 1 / (1/steps + 1/pass) per token), which is the
honest figure for a one-epoch run; the pass's cost per token shrinks with every further epoch.

Both sides run in this one process with the same torch thread count (`bench_threads`), in
alternating rounds of about equal step time (see `alignloop.bench.training.alternate`).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Sequence
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
from alignloop.train.config import DPOTrainSection, LoraSection
from alignloop.train.dpo import PreferenceObjective, compute_reference
from alignloop.train.dpo_data import Pair, collate_pairs, tokenize_pairs
from alignloop.train.sft_data import epoch_chunks
from alignloop.ui import say

PAIRS_PER_STEP = 4    # pairs per optimizer step, both sides
LR = 1e-6             # TRL's DPO default (it does not change the speed)
BETA = 0.1            # TRL's default
MAX_SEQ_LEN = 1024    # per side; every bench pair fits (TRL's default max_length is also 1024)
N_PAIRS = 64         # more than the bench's rounds train on; fewer keeps the reference pass short
SEED = 0


# --- the work ------------------------------------------------------------------------------------


def bench_pairs(n: int = N_PAIRS, seed: int = SEED) -> list[dict[str, Any]]:
    """n preference pairs in TRL's conversational format, the same on every call."""
    prompts = bench_prompts()
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [{"role": "user", "content": rng.choice(prompts)}]
        if rng.random() < 0.5:
            prompt += [{"role": "assistant", "content": answer(rng, rng.randint(12, 40))},
                       {"role": "user", "content": rng.choice(prompts)}]
        chosen = answer(rng, rng.randint(12, 70))
        rejected = answer(rng, rng.randint(12, 70))
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


def bench_settings() -> dict[str, Any]:
    """What both sides share (the unit test checks that each side's config says the same)."""
    return {"batch": PAIRS_PER_STEP, "grad_accum": 1, "lr": LR, "beta": BETA, "lora": dict(LORA),
            "max_grad_norm": 1.0, "bf16_autocast": True, "base_dtype": "bfloat16", "adapter_dtype": "float32"}


# --- our side -----------------------------------------------------------------------------------


def our_train_section(bf16: bool = True) -> DPOTrainSection:
    # micro_batch = 1 row per step: `StepRows` puts the step's 4 pairs in that one row.
    return DPOTrainSection(
        loss="dpo", beta=BETA, lr=LR, micro_batch=1, grad_accum=1, max_grad_norm=1.0, bf16=bf16,
        max_seq_len=MAX_SEQ_LEN, lora=LoraSection(**LORA), schedule="constant", warmup_steps=0,
        steps=1_000_000, save_every=1_000_000_000, eval_every=0, eval_fraction=0.0, device="cpu", seed=SEED)


class StepRows:
    """`batches(epoch)`: `per_row` pairs per row, one row per micro batch, pairs reshuffled each epoch.

    The trainer's own `PairBatches` packs rows by length, so a step holds as many pairs as fit;
    the bench needs exactly TRL's 4 pairs per step, packed the same way (isolated documents).
    """

    def __init__(self, pairs, per_row: int, pad_id: int, reference: torch.Tensor | None, seed: int = SEED) -> None:
        self.pairs, self.per_row, self.pad_id, self.reference, self.seed = list(pairs), per_row, pad_id, reference, seed

    def __call__(self, epoch: int) -> Sequence[Any]:
        chunks = epoch_chunks(len(self.pairs), self.per_row, self.seed, epoch)
        source = self

        class Lazy(Sequence):
            def __len__(self) -> int:
                return len(chunks)

            def __getitem__(self, i):  # collated when the loop asks, like the trainers' batches
                return collate_pairs([[source.pairs[j] for j in chunks[i]]], source.pad_id, source.reference)

        return Lazy()

    def __len__(self) -> int:
        return math.ceil(len(self.pairs) / self.per_row)


def our_pairs(tokenizer: Any, pairs: list[dict[str, Any]]):
    """Our tokenized pairs (and counts), through the trainer's own reader and tokenizer."""
    rows = [Pair(p["prompt"], p["chosen"], p["rejected"], 1.0, f"bench:{i}", f"bench:{i}")
            for i, p in enumerate(pairs)]
    return tokenize_pairs(tokenizer, rows, MAX_SEQ_LEN)


class Ours(OurSide):
    """Our DPO (TokenLogprobs + PreferenceObjective + the cached reference + the shared loop)."""

    def __init__(self, model_name: str, pairs: list[dict[str, Any]], workdir: Path, base_dtype: str = "bfloat16",
                 bf16: bool = True) -> None:
        model, tokenizer = load_model(model_name, dtype=base_dtype)
        self.pairs, self.counts = our_pairs(tokenizer, pairs)
        self.pad_id = tokenizer.pad_token_id or 0
        super().__init__(model, our_train_section(bf16=bf16), workdir, SEED)
        self.reference_seconds = 0.0
        self.batches: StepRows | None = None

    def compute_reference(self) -> None:
        """The reference pass, as `run_dpo` runs it (packed rows of 2 x max_seq_len, 4 rows a batch)."""
        began = time.perf_counter()
        reference = compute_reference(self.module, self.pairs, PAIRS_PER_STEP, 2 * MAX_SEQ_LEN, self.pad_id,
                                      torch.device("cpu"), self.config.bf16)
        self.reference_seconds = time.perf_counter() - began
        self.batches = StepRows(self.pairs, PAIRS_PER_STEP, self.pad_id, reference)

    def pair_tokens(self) -> int:
        return sum(len(p) for p in self.pairs)

    def token_ids(self) -> list[list[int]]:
        return [list(ex.input_ids) for p in self.pairs for ex in (p.chosen, p.rejected)]

    def describe(self) -> dict[str, Any]:
        return self.setup(PAIRS_PER_STEP * self.config.micro_batch, beta=self.config.beta)

    def run(self, side: Side, seconds: float) -> float:
        if self.batches is None:
            self.compute_reference()
        return self.train_round(PreferenceObjective("dpo", BETA), self.batches, "dpo", side, seconds)


# --- TRL's side ---------------------------------------------------------------------------------


def peer_dpo_config(output_dir: str | Path, max_steps: int = 1_000_000):
    """TRL's DPOConfig: its defaults, but for the batch size, a step cap, and no checkpoints."""
    from trl import DPOConfig  # optional extra, checked by require_trl

    return trl_config(DPOConfig, output_dir, PAIRS_PER_STEP, LR, max_steps, beta=BETA)


class Peer(TrlPeer):
    """TRL's DPOTrainer with its defaults (see the module docstring), in rounds."""

    def __init__(self, model_name: str, pairs: list[dict[str, Any]], workdir: Path) -> None:
        from trl import DPOTrainer  # optional extra, checked by require_trl

        super().__init__(DPOTrainer, model_name, lambda: peer_dpo_config(workdir / "trl"), pairs, SEED)

    def _rows(self) -> list[dict[str, list[int]]]:
        d = self.trainer.train_dataset
        return [{"prompt": p, "chosen": c, "rejected": r}
                for p, c, r in zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"])]

    def pair_tokens(self) -> int:
        return sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in self._rows())

    def token_ids(self) -> list[list[int]]:
        return [list(r["prompt"]) + list(r[side]) for r in self._rows() for side in ("chosen", "rejected")]

    def describe(self) -> dict[str, Any]:
        args = self.trainer.args
        return {**self.setup(beta=args.beta), "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
                "padding_free": bool(args.padding_free), "loss_type": list(args.loss_type)}


# --- the bench ----------------------------------------------------------------------------------


def run_bench(model: str = "smollm2-135m", rounds: int = 3, n_pairs: int = N_PAIRS,
              threads: int | None = None) -> dict:
    """Time ours and TRL in alternating rounds; return the one-line summary (see module docstring)."""
    return run_against_trl("dpo", threads, lambda load: _run(model, rounds, n_pairs, load))


def _run(model: str, rounds: int, n_pairs: int, load: float) -> dict:
    pairs = bench_pairs(n_pairs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-dpo-") as tmp:
        work = Path(tmp)
        say(f"bench dpo: {model}, {len(pairs)} pairs, {PAIRS_PER_STEP} pairs per step, LoRA r={LORA['r']}; "
            f"{rounds} alternating rounds, torch threads {torch.get_num_threads()}")
        ours = Ours(model, pairs, work)
        peer = Peer(model, pairs, work)
        ours.compute_reference()
        sides = alternate("dpo", {"ours": ours.run, "peer": peer.run}, rounds)
        ours_setup, peer_setup = ours.describe(), peer.describe()
        same_tokens = sorted(ours.token_ids()) == sorted(peer.token_ids())
        tokens = {"ours": ours.pair_tokens(), "peer": peer.pair_tokens()}
        scored = {"ours": ours.counts.response_tokens,
                  "peer": sum(len(r["chosen"]) + len(r["rejected"]) for r in peer._rows())}

    o, p = sides["ours"].tok_s, sides["peer"].tok_s
    ref_rate = tokens["ours"] / ours.reference_seconds if ours.reference_seconds else 0.0
    with_ref = 1.0 / (1.0 / o + 1.0 / ref_rate) if o and ref_rate else 0.0
    line = {"bench": "dpo", "ours": round(o, 1), "peer": round(p, 1), "unit": "trained pair tokens/s",
            "ratio": round(o / max(p, 1e-9), 2),
            "metric": "non-pad tokens of prompt+chosen and prompt+rejected per second of optimizer steps "
                      "(first step of each side is warm-up)",
            "precision": "both: bf16 base weights, fp32 LoRA adapters, bf16 autocast"
                         " (ours computes CPU attention in fp32)",
            "ours_config": f"reference log-probs precomputed once (adapters disabled) and looked up; "
                           f"{PAIRS_PER_STEP} pairs per step packed in one row, per-sequence attention, "
                           f"chosen+rejected in one forward, vocab projection on response tokens only, "
                           f"no grad checkpointing",
            "peer_config": f"trl {trl_version()} DPOTrainer defaults: chosen+rejected in one padded batch, "
                           f"reference forward (adapters disabled) every step, gradient checkpointing; "
                           f"batch {PAIRS_PER_STEP} pairs",
            "ours_reference_pass": {"seconds": round(ours.reference_seconds, 1), "pair_tokens_per_s": round(ref_rate, 1)},
            "ours_with_reference_pass": round(with_ref, 1),
            "ratio_with_reference_pass": round(with_ref / max(p, 1e-9), 2),
            "model": model, "pairs": len(pairs), "kept_pairs": ours.counts.kept, "same_token_ids": same_tokens,
            "pair_tokens": tokens, "scored_tokens": scored,
            **closing_facts(sides, ours_setup, peer_setup, load, started)}
    table("bench dpo", sides)
    return line
