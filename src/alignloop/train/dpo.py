"""Preference optimisation from (prompt, chosen, rejected) pairs: the losses and the reference.

One option, `train.loss`, picks the objective. With s(y) the policy's summed log-prob of response
y (its final assistant turn only), r(y) the frozen reference's, |y| its token count, and
sigma the logistic function:

    dpo    rewards  R(y) = beta * (s(y) - r(y))
           loss     -log sigma(R(chosen) - R(rejected))
    ipo    rewards  as dpo;  h = (s(c) - r(c)) - (s(rej) - r(rej))
           loss     (h - 1 / (2 beta))^2          (IPO's squared loss on sequence log-ratios)
    simpo  rewards  R(y) = beta * s(y) / |y|      (reference-free, length-normalised)
           loss     -log sigma(R(chosen) - R(rejected) - gamma)

Each pair's loss is multiplied by its sample weight; a step's loss is the mean over its pairs.
The logged rewards, `margin` (= R(chosen) - R(rejected)) and `accuracy` (share of pairs with a
positive margin, a tie counting one half) are unweighted means over pairs; with `eval_` in front
they are the same on the held-out pairs, every `eval_every` steps and at the end. `accuracy` is
relative to the reference (0.5 at step 0 by construction); `logp_accuracy` (chosen has the higher
mean log-prob per token) is the model's own preference, comparable across models: the manifest's
`baseline` holds the held-out numbers of the starting model (e.g. the SFT model) for comparison.

Reference log-probs (dpo, ipo) come from one pass of the frozen reference, i.e. the initial
policy (for LoRA: the base model with its adapters disabled), over every pair before training.
They are cached in the stage folder (`reference_logps.safetensors`, keyed by the model, the
tokens and the precision) so a resumed or retrained run never computes them again; training then
needs no second model in memory. SimPO computes none.

`alignloop train dpo RECIPE` (`alignloop.train.stage.run_dpo`) writes runs/<run>/dpo/: model/
(merged HF checkpoint), checkpoints/, metrics.jsonl, reference_logps.safetensors, manifest.json.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from alignloop.models.fingerprint import model_fingerprint
from alignloop.runs import config_hash
from alignloop.sections import ModelSection
from alignloop.train import dist
from alignloop.train.cache import load_or_compute
from alignloop.train.config import DPOTrainSection, LossKind
from alignloop.train.dpo_data import PairBatch, PairBatches, TokenizedPair, pairs_digest
from alignloop.train.loop import autocast
from alignloop.train.lora import is_lora
from alignloop.ui import progress

REFERENCE_FILE = "reference_logps.safetensors"


# --- the loss ----------------------------------------------------------------------------------


def preference_loss(
    policy: torch.Tensor,             # [P, 2] summed log-probs (chosen, rejected)
    reference: torch.Tensor | None,   # [P, 2] the reference's, or None (simpo)
    lengths: torch.Tensor,            # [P, 2] scored tokens per side
    kind: LossKind,
    beta: float,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss [P], rewards [P, 2]) for one of the variants in the module docstring."""
    if kind == "simpo":
        rewards = beta * policy / lengths.clamp(min=1)
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - gamma), rewards
    if reference is None:
        raise ValueError(f"loss '{kind}' needs reference log-probs")
    ratio = policy - reference
    rewards = beta * ratio
    if kind == "dpo":
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards
    if kind == "ipo":
        h = ratio[:, 0] - ratio[:, 1]
        return (h - 1.0 / (2.0 * beta)) ** 2, rewards
    raise ValueError(f"unknown preference loss '{kind}'")


def sequence_logps(module: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """[P, 2] summed log-probs of each pair's chosen and rejected response.

    Both sides of every pair go through one forward, as documents of packed rows; attention runs
    per document (`segments`), so no dense [B, 1, L, L] mask is built and no query scores a key
    of another side or pair (see `TokenLogprobs`).
    """
    pk = batch.packed
    select = pk.loss_mask
    logp = module(pk.input_ids, pk.position_ids, None, select, pk.targets[select], segments=pk.doc_ids)
    sums = torch.zeros(2 * batch.n_pairs, dtype=logp.dtype, device=logp.device).index_add_(0, batch.seq, logp)
    return sums.view(batch.n_pairs, 2)


class PreferenceObjective:
    """The loop's Objective for DPO/IPO/SimPO: weight = pairs, loss = sum of weighted pair losses."""

    def __init__(self, kind: LossKind, beta: float, gamma: float = 0.0) -> None:
        self.kind, self.beta, self.gamma = kind, beta, gamma

    def weight(self, batch: PairBatch) -> float:
        return float(batch.n_pairs)

    def loss(self, module: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        policy = sequence_logps(module, batch)
        losses, rewards = preference_loss(policy, batch.reference, batch.lengths, self.kind, self.beta, self.gamma)
        r = rewards.detach()
        margin = r[:, 0] - r[:, 1]
        accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
        # The model's own preference, with no reference: mean log-prob per token, chosen vs rejected.
        # Unlike `accuracy` it can be compared across models (e.g. the SFT model's vs DPO's).
        per_token = policy.detach() / batch.lengths.clamp(min=1)
        own = (per_token[:, 0] > per_token[:, 1]).float() + 0.5 * (per_token[:, 0] == per_token[:, 1]).float()
        stats = {
            "rewards/chosen_sum": float(r[:, 0].sum()),
            "rewards/rejected_sum": float(r[:, 1].sum()),
            "margin_sum": float(margin.sum()),
            "accuracy_sum": float(accuracy.sum()),
            "logp_accuracy_sum": float(own.sum()),
            "logps/chosen_sum": float(policy.detach()[:, 0].sum()),
            "logps/rejected_sum": float(policy.detach()[:, 1].sum()),
            "pairs": batch.n_pairs,
            "tokens": batch.packed.n_tokens,
        }
        return (losses * batch.weight).sum(), stats


# --- reference log-probs -----------------------------------------------------------------------


def _reference_forward(module: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """One forward of the frozen reference over a batch (tests count these)."""
    return sequence_logps(module, batch)


def compute_reference(module: torch.nn.Module, pairs: Sequence[TokenizedPair], micro_batch: int, row_len: int,
                      pad_id: int, device: torch.device, bf16: bool, packing: bool = True) -> torch.Tensor:
    """[len(pairs), 2] reference log-probs, pair i in row `pairs[i].index`; weights and RNG untouched.

    For a LoRA model the adapters are switched off during the pass: the reference is the base model.
    """
    table = torch.full((len(pairs), 2), math.nan, dtype=torch.float32)
    batches = PairBatches(pairs, row_len, micro_batch, pad_id=pad_id, packing=packing, shuffle=False)(0)
    if any(p.index != i for i, p in enumerate(pairs)):
        raise ValueError("compute_reference takes all pairs, in index order")
    inner = getattr(module, "model", module)
    no_adapters = inner.disable_adapter() if is_lora(inner) else contextlib.nullcontext()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), no_adapters, autocast(device, bf16), progress() as bar:
            task = bar.add_task("reference log-probs", total=len(batches), info="")
            for i in range(len(batches)):
                index = torch.tensor([p.index for p in batches.items(i)], dtype=torch.long)
                table[index] = _reference_forward(module, batches[i].to(device)).float().cpu()
                bar.update(task, advance=1)
    finally:
        module.train(was_training)
    if torch.isnan(table).any():
        raise RuntimeError("reference pass left pairs without log-probs")  # a bug, not bad input
    return table


def cached_reference(module: torch.nn.Module, pairs: Sequence[TokenizedPair], model: ModelSection,
                     cfg: DPOTrainSection, pad_id: int, path: Path) -> torch.Tensor | None:
    """The reference log-probs of `pairs` (None for simpo): from the cache at `path`, else computed.

    The cache is keyed by the model, the tokens and the precision. Under torchrun rank 0 computes
    and writes it; the others then find it there and read it.
    """
    if cfg.loss == "simpo":
        return None
    device = next(module.parameters()).device
    # version 2: per-document attention (the policy's forward must match the reference's exactly)
    fingerprint = config_hash({"model": model_fingerprint(model), "tokens": pairs_digest(pairs),
                               "bf16": cfg.bf16, "device": device.type, "version": 2})
    with dist.main_first():
        return load_or_compute(path, fingerprint, lambda: {"logps": compute_reference(
            module, pairs, cfg.micro_batch, 2 * cfg.max_seq_len, pad_id, device, cfg.bf16, cfg.packing)},
            "reference log-probs")["logps"]


def pair_batches(train: Sequence[TokenizedPair], held_out: Sequence[TokenizedPair], cfg: DPOTrainSection,
                 pad_id: int, reference: torch.Tensor | None) -> tuple[PairBatches, Sequence[PairBatch]]:
    """(the training batches of every epoch, the held-out batches): rows of up to 2 x max_seq_len."""
    row_len = 2 * cfg.max_seq_len
    batches = PairBatches(train, row_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id, packing=cfg.packing,
                          reference=reference)
    eval_batches = PairBatches(held_out, row_len, cfg.micro_batch, pad_id=pad_id, packing=cfg.packing,
                               shuffle=False, reference=reference)(0) if held_out else ()
    return batches, eval_batches
