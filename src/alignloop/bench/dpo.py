"""`alignloop bench dpo`: preference-optimisation throughput, our DPO trainer vs TRL's `DPOTrainer` at its best.

Work, the same on both sides: a fixed set of 64 preference pairs, generated deterministically
from the 64 bench prompts (a prompt of one or two user turns, with an assistant answer between
them, and two different seeded synthetic answers of 12-70 words as the chosen and the rejected
response), rendered with SmolLM2's chat template to the same token ids; 4 pairs per optimizer
step, sigmoid DPO loss with beta 0.1 (TRL's defaults), the reference = the base model with the
adapters disabled, its log-probs computed once before training in a separate pass (both sides);
SmolLM2-135M with LoRA r=16 / alpha 32 / no dropout on all linear layers, AdamW (fused), lr 1e-6
constant, clipping at 1.0, no gradient checkpointing. Precision: bf16 base weights, fp32 adapters
(peft's default), bf16 autocast (TRL's default `bf16=True`); `--dtype float32` runs both sides
with fp32 weights and no autocast instead.

Metric: trained pair tokens per second, i.e. the non-pad tokens of both sequences of every pair
(prompt + chosen, prompt + rejected: what a DPO step must score) that go through the training
forward and backward, per second of optimizer steps. Ours is timed by the loop's per-step clock
(collation, forward, backward, clipping, AdamW); TRL's between its `on_step_begin` and
`on_step_end` callbacks (its data loader collates the batch before, untimed). The reference pass
of each side is timed on its own and reported beside the steps (`reference_pass`: seconds and
pair tokens/s), with each side's rate for one epoch that includes it (`with_reference_pass`).
Rounds: every side first trains `steps` untimed steps (warm-up), then `rounds` >= 3 rounds of
`steps` steps each, the order flipping every round, both sides timed on the same number of steps;
the line reports the median and min/max per side.

TRL, configured as its docs recommend for speed (`DPOConfig`, `peer_settings`):
`precompute_ref_log_probs=True` (the reference's log-probs computed once, in
`DPOTrainer.__init__`, in batches of `precompute_ref_batch_size` = its training batch, the
default), `gradient_checkpointing=False` (TRL defaults to True), `lr_scheduler_type="constant"` as
ours (no effect on speed), the rest at its defaults: fused AdamW, its fused LM head, bf16
autocast, sdpa attention, a pair's chosen and rejected in one forward. One more setting, for CPU:
one pair per forward, 4 accumulated per step (`per_device_train_batch_size=1`,
`gradient_accumulation_steps=4`), the same 4 pairs per step: TRL pads a forward's sequences to the
longest of them, and a single pair's two sequences share their prompt, so they pad far less than
eight sequences of four pairs. Measured here (1 thread, CPU seconds, the same first step): 13.7
with 4 pairs per forward, 11.1 with 1; its reference pass 59.8 and 47.4.

What differs, and cannot be set alike:
- LoRA: both train the same peft adapters; ours runs them through its own forward
  (`alignloop.train.lora_forward`: the scale folded into B, the add into the matmul, no
  bf16 -> fp32 -> bf16 round trip of each adapter's input under autocast), TRL through peft's.
- padding: TRL pads a pair's two sequences to the longer one (its `padding_free` is "temporarily
  unavailable" for DPO in TRL 1.x: it warns and falls back to padding), so it computes `computed`
  tokens per step against `useful`; ours packs the step's 8 sequences into one row and runs
  attention per sequence (fp32 on CPU), no padding.
- scored tokens: TRL's completion is everything after the prompt, which with SmolLM2's template
  includes the "\\n" after the final `<|im_end|>`; ours scores the response up to `<|im_end|>`.
  So TRL scores one more token per sequence (`scored_tokens` per side; the token ids are the same).
- the LM head: TRL's fused head projects every position on CPU, prompt included (it projects only
  the scored ones on Triton devices), and computes each position's entropy, mean logit and top-1
  match for its metrics, in every step and in its reference pass; no setting turns that off.
  Ours projects only the scored positions and computes their label log-probs.
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

from alignloop.bench.harness import alternate_rounds, headline, machine_facts, summary
from alignloop.bench.prompts import bench_prompts
from alignloop.bench.training import (
    LORA,
    OurSide,
    Side,
    TrlPeer,
    answer,
    check_dtype,
    enum_value,
    load_average,
    run_against_trl,
    step_rounds,
    tokens_per_step,
    trl_config,
    trl_version,
)
from alignloop.models import load_model
from alignloop.train.config import DPOTrainSection, LoraSection
from alignloop.train.dpo import PreferenceObjective, compute_reference
from alignloop.train.dpo_data import Pair, PairBatches, collate_pairs, tokenize_pairs
from alignloop.train.sft_data import epoch_chunks
from alignloop.ui import say

PAIRS_PER_STEP = 4    # pairs per optimizer step, both sides
PEER_MICRO_BATCH = 1  # pairs per TRL forward (x 4 accumulated): see the module docstring
LR = 1e-6             # TRL's DPO default (it does not change the speed)
BETA = 0.1            # TRL's default
MAX_SEQ_LEN = 1024    # per sequence; every bench pair fits (TRL's default max_length is also 1024)
N_PAIRS = 64
STEPS = 2             # optimizer steps per round, both sides
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


def bench_settings(dtype: str = "bfloat16") -> dict[str, Any]:
    """What both sides share (the unit test checks that each side's config says the same)."""
    return {"pairs_per_step": PAIRS_PER_STEP, "lr": LR, "beta": BETA, "lora": dict(LORA),
            "max_grad_norm": 1.0, "bf16_autocast": dtype == "bfloat16", "base_dtype": dtype,
            "adapter_dtype": "float32", "gradient_checkpointing": False, "precompute_reference": True}


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
    """Our DPO (TokenLogprobs + PreferenceObjective + the precomputed reference + the shared loop)."""

    def __init__(self, model_name: str, pairs: list[dict[str, Any]], workdir: Path, dtype: str = "bfloat16") -> None:
        model, tokenizer = load_model(model_name, dtype=dtype)
        self.pairs, self.counts = our_pairs(tokenizer, pairs)
        self.pad_id = tokenizer.pad_token_id or 0
        super().__init__(model, our_train_section(bf16=dtype == "bfloat16"), workdir, SEED)
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

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(token ids, scored mask) of every sequence (prompt + chosen, prompt + rejected)."""
        return [(list(ex.input_ids), list(ex.loss_mask)) for p in self.pairs for ex in (p.chosen, p.rejected)]

    def describe(self) -> dict[str, Any]:
        return {**self.setup(PAIRS_PER_STEP * self.config.micro_batch, beta=self.config.beta),
                "pairs_per_step": PAIRS_PER_STEP * self.config.micro_batch * self.config.grad_accum,
                "gradient_checkpointing": False, "precompute_reference": True, "loss_type": ["sigmoid"]}

    def run(self, side: Side, seconds: float) -> float:
        if self.batches is None:
            self.compute_reference()
        return self.train_round(PreferenceObjective("dpo", BETA), self.batches, "dpo", side, seconds)

    def run_steps(self, side: Side, steps: int) -> None:
        if self.batches is None:
            self.compute_reference()
        self.train_round(PreferenceObjective("dpo", BETA), self.batches, "dpo", side, 0.0, steps=steps)


# --- TRL's side ---------------------------------------------------------------------------------


def peer_settings() -> dict[str, Any]:
    """The `DPOConfig` settings the bench sets beyond batch, lr, beta, step cap and output."""
    return {"precompute_ref_log_probs": True, "gradient_checkpointing": False, "lr_scheduler_type": "constant",
            "disable_tqdm": True}


def peer_dpo_config(output_dir: str | Path, dtype: str = "bfloat16", micro_batch: int = PEER_MICRO_BATCH,
                    max_steps: int = 1_000_000):
    """TRL's DPOConfig at its best for this work (`peer_settings`, `micro_batch` pairs per forward,
    PAIRS_PER_STEP per step), else its defaults."""
    from trl import DPOConfig  # optional extra, checked by require_trl

    return trl_config(DPOConfig, output_dir, micro_batch, LR, max_steps, grad_accum=PAIRS_PER_STEP // micro_batch,
                      beta=BETA, bf16=dtype == "bfloat16", **peer_settings())


def timed_precompute(trainer_cls: type) -> type:
    """`trainer_cls` with its reference precompute pass timed (`precompute_seconds`, `precompute_tokens`)."""

    class Timed(trainer_cls):
        precompute_seconds = 0.0
        precompute_tokens = 0

        def compute_ref_log_probs(self, model, inputs):
            self.precompute_tokens += int(inputs["input_ids"].numel())
            return super().compute_ref_log_probs(model, inputs)

        def _precompute_ref_logps(self, *args, **kwargs):
            began = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                self.precompute_seconds += time.perf_counter() - began

    return Timed


class Peer(TrlPeer):
    """TRL's DPOTrainer, reference precomputed, no checkpointing, in rounds."""

    def __init__(self, model_name: str, pairs: list[dict[str, Any]], workdir: Path, dtype: str = "bfloat16",
                 micro_batch: int = PEER_MICRO_BATCH) -> None:
        from trl import DPOTrainer  # optional extra, checked by require_trl

        if PAIRS_PER_STEP % micro_batch:
            raise ValueError(f"micro_batch {micro_batch} does not divide the {PAIRS_PER_STEP} pairs of a step")
        super().__init__(timed_precompute(DPOTrainer), model_name,
                         lambda: peer_dpo_config(workdir / "trl", dtype, micro_batch), pairs, SEED, dtype=dtype)

    def _rows(self) -> list[dict[str, list[int]]]:
        d = self.trainer.train_dataset
        return [{"prompt": p, "chosen": c, "rejected": r}
                for p, c, r in zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"])]

    def pair_tokens(self) -> int:
        return sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in self._rows())

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        """(token ids, scored mask) of every sequence; mask[j] = 1: token j is scored (predicted from j-1)."""
        return [(list(r["prompt"]) + list(r[side]), [0] * len(r["prompt"]) + [1] * len(r[side]))
                for r in self._rows() for side in ("chosen", "rejected")]

    def describe(self) -> dict[str, Any]:
        a = self.trainer.args
        return {**self.setup(beta=a.beta), "pairs_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
                "precompute_reference": bool(a.precompute_ref_log_probs),
                "precompute_ref_batch_size": a.precompute_ref_batch_size or a.per_device_train_batch_size,
                "padding_free": bool(a.padding_free), "loss_type": list(a.loss_type), "optim": enum_value(a.optim),
                "lr_scheduler_type": enum_value(a.lr_scheduler_type),
                "attn_implementation": self.trainer.model.config._attn_implementation}


# --- the bench ----------------------------------------------------------------------------------


def run_bench(model: str = "smollm2-135m", rounds: int = 3, steps: int = STEPS, dtype: str = "bfloat16",
              n_pairs: int = N_PAIRS, threads: int | None = None) -> dict:
    """Both reference passes, warm-up, then `rounds` alternating rounds of `steps` steps per side."""
    check_dtype(dtype)
    return run_against_trl("dpo", threads, lambda load: _run(model, rounds, steps, dtype, n_pairs, load))


def _run(model: str, rounds: int, steps: int, dtype: str, n_pairs: int, load: float) -> dict:
    pairs = bench_pairs(n_pairs)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-dpo-") as tmp:
        work = Path(tmp)
        say(f"bench dpo: {model} ({dtype}), {len(pairs)} pairs, {PAIRS_PER_STEP} pairs per step, "
            f"LoRA r={LORA['r']}; warm-up + {rounds} alternating rounds of {steps} steps, torch threads {threads}")
        ours = Ours(model, pairs, work, dtype)
        ours.compute_reference()
        peer = Peer(model, pairs, work, dtype)  # its reference pass runs in here
        configs = {"ours": step_rounds(ours.run_steps, "ours", steps),
                   "peer": step_rounds(peer.run_steps, "peer", steps)}
        results = alternate_rounds(configs, rounds=rounds, label="bench dpo")
        ours_setup, peer_setup = ours.describe(), peer.describe()
        same = same_sequences(ours.sequences(), peer.sequences())
        tokens = {"ours": ours.pair_tokens(), "peer": peer.pair_tokens()}
        scored = {"ours": ours.counts.response_tokens,
                  "peer": sum(len(r["chosen"]) + len(r["rejected"]) for r in peer._rows())}
        reference = {"ours": {"seconds": ours.reference_seconds, "computed_tokens": reference_slots(ours)},
                     "peer": {"seconds": peer.trainer.precompute_seconds,
                              "computed_tokens": peer.trainer.precompute_tokens}}

    ours_sum, peer_sum = summary(results["ours"]), summary(results["peer"])
    for side, ref in reference.items():
        ref["pair_tokens_per_s"] = round(tokens[side] / ref["seconds"], 1) if ref["seconds"] else 0.0
        ref["seconds"] = round(ref["seconds"], 1)
    with_ref = {side: one_epoch_rate(s["median"], reference[side]["pair_tokens_per_s"])
                for side, s in (("ours", ours_sum), ("peer", peer_sum))}
    per_step = tokens_per_step(results)
    return headline(
        "dpo", ours_sum, peer_sum, "trained pair tokens/s",
        ours_config=f"alignloop: reference precomputed; {PAIRS_PER_STEP} pairs per step packed in one row, "
                    f"per-sequence attention, chosen+rejected in one forward, vocab projection at scored tokens, "
                    f"no grad checkpointing, {dtype}",
        peer_config=f"trl {trl_version()} DPOTrainer: precompute_ref_log_probs, gradient_checkpointing off, "
                    f"chosen+rejected in one padded batch (padding_free unavailable for DPO), "
                    f"{PEER_MICRO_BATCH} pair(s) per forward x {PAIRS_PER_STEP // PEER_MICRO_BATCH} accumulated, {dtype}",
        machine=machine_facts(threads, peers=("trl", "transformers", "peft")),
        dtype=dtype, steps_per_round=steps,
        tokens_per_step=per_step,  # measured in the timed rounds: useful = non-pad, computed = + padding
        reference_pass=reference, with_reference_pass=with_ref,
        ratio_with_reference_pass=round(with_ref["ours"] / with_ref["peer"], 2) if with_ref["peer"] else None,
        pairs=len(pairs), kept_pairs=ours.counts.kept, same_token_ids=same["ids"],
        same_scored_positions_but_final_newline=same["mask"], pair_tokens=tokens, scored_tokens=scored,
        ours_setup=ours_setup, peer_setup=peer_setup,
        peer_settings={**peer_settings(), "per_device_train_batch_size": PEER_MICRO_BATCH,
                       "gradient_accumulation_steps": PAIRS_PER_STEP // PEER_MICRO_BATCH, "bf16": dtype == "bfloat16"},
        load_at_start=round(load, 2), load_at_end=round(load_average(), 2),
        seconds=round(time.perf_counter() - started, 1))


def one_epoch_rate(steps_rate: float, reference_rate: float) -> float:
    """Pair tokens/s of one epoch that pays for its reference pass: 1 / (1/steps + 1/pass)."""
    return round(1.0 / (1.0 / steps_rate + 1.0 / reference_rate), 1) if steps_rate and reference_rate else 0.0


def reference_slots(ours: Ours) -> int:
    """Tokens (padding included) our reference pass runs through: its packed rows, padded per batch."""
    batches = PairBatches(ours.pairs, 2 * MAX_SEQ_LEN, PAIRS_PER_STEP, pad_id=ours.pad_id, shuffle=False)(0)
    return sum(int(batches[i].packed.input_ids.numel()) for i in range(len(batches)))


def same_sequences(ours: list[tuple[list[int], list[int]]], peer: list[tuple[list[int], list[int]]]
                   ) -> dict[str, bool]:
    """Whether both sides hold the same sequences (token ids), and score the same positions but for
    TRL's one extra: the token after the final `<|im_end|>` (see the module docstring)."""
    ours_sorted, peer_sorted = sorted(ours), sorted(peer)
    same_ids = [i for i, _ in ours_sorted] == [i for i, _ in peer_sorted]
    same_mask = same_ids and all(a[:-1] == b[:-1] and a[-1] == 0 and b[-1] == 1
                                 for (_, a), (_, b) in zip(ours_sorted, peer_sorted))
    return {"ids": same_ids, "mask": same_mask}
