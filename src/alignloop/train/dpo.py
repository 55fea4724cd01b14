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
    ld_dpo rewards  as dpo, with s and r length-desensitised (LD-DPO): each side's log-prob is split
                    at m = min(|chosen|, |rejected|) tokens into the shared part s_m(y) (its first
                    m tokens) and the excess, and s(y) becomes s_m(y) + ld_alpha * (s(y) - s_m(y))
                    (the shorter side is unchanged); likewise r. ld_alpha = 1 is dpo.
           loss     as dpo
    rdpo   rewards  as dpo
           loss     -log sigma(R(chosen) - R(rejected) - length_alpha * (|chosen| - |rejected|))
                    (R-DPO: a longer chosen side must win by more; length_alpha = 0 is dpo)
    kto    unpaired answers with a label (desirable or not); `chosen` is the answer, `rejected`
           the same prompt with another row's answer (`alignloop.train.kto_data`), only used for
           the reference point z = max(0, mean over the micro batch of (s - r)(mismatched)),
           detached (KTO's KL estimate). With rho = s(answer) - r(answer):
           loss     desirable_weight * (1 - sigma(beta * (rho - z)))     label desirable
                    undesirable_weight * (1 - sigma(beta * (z - rho)))   label undesirable
           rewards  beta * rho (answer), beta * (s - r)(mismatched)

Why the length-controlled variants: on the simulated logs the chosen swipe is on average shorter
than the rejected one, and plain DPO extrapolates that into answers far shorter than users like.
LD-DPO damps the log-prob of the excess tokens, where most of the length signal lives; R-DPO
subtracts the length difference from the margin; KTO learns from thumbs with no pairing at all.

Each pair's loss is multiplied by its sample weight; a step's loss is the mean over its pairs.
The logged rewards, `margin` (= R(chosen) - R(rejected)) and `accuracy` (share of pairs with a
positive margin, a tie counting one half) are unweighted means over pairs; with `eval_` in front
they are the same on the held-out pairs, every `eval_every` steps and at the end. `accuracy` is
relative to the reference (0.5 at step 0 by construction); `logp_accuracy` (chosen has the higher
mean log-prob per token) is the model's own preference, comparable across models: the manifest's
`baseline` holds the held-out numbers of the starting model (e.g. the SFT model) for comparison.

Reference log-probs (all but simpo) come from one pass of the frozen reference, i.e. the initial
policy (for LoRA: the base model with its adapters disabled), over every pair before training.
They are cached in the stage folder (`reference_logps.safetensors`, keyed by the model, the
tokens, the precision and whether the shared-length sums are kept (ld_dpo)) so a resumed or
retrained run never computes them again; training then needs no second model in memory. SimPO
computes none. KTO's cover both columns: the answers and the mismatched answers.

`alignloop train dpo RECIPE` (`alignloop.train.stage.run_dpo`) writes runs/<run>/dpo/: model/
(merged HF checkpoint), checkpoints/, metrics.jsonl, reference_logps.safetensors, manifest.json.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from alignloop.models.fingerprint import model_fingerprint
from alignloop.runs import config_hash
from alignloop.sections import ModelSection
from alignloop.train import dist, expert_parallel
from alignloop.train.cache import load_or_compute
from alignloop.train.config import DPOTrainSection, LossKind
from alignloop.train.dpo_data import PairBatch, PairBatches, TokenizedPair, pairs_digest
from alignloop.train.loop import autocast
from alignloop.train.lora import is_lora
from alignloop.ui import progress

REFERENCE_FILE = "reference_logps.safetensors"


# --- the loss ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossOptions:
    """The knobs of the variants beyond beta (see the module docstring); defaults leave them off."""

    gamma: float = 0.0               # simpo: target margin
    ld_alpha: float = 1.0            # ld_dpo: weight of the tokens past the shorter side's length
    length_alpha: float = 0.0        # rdpo: margin per token of length difference
    desirable_weight: float = 1.0    # kto
    undesirable_weight: float = 1.0  # kto


def desensitise(logps: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """[P, 2, 2] (full sum, sum over the first min(|c|, |r|) tokens) -> [P, 2] LD-DPO log-probs."""
    full, shared = logps[..., 0], logps[..., 1]
    return shared + ld_alpha * (full - shared)


def preference_loss(
    policy: torch.Tensor,             # [P, 2] summed log-probs (chosen, rejected); [P, 2, 2] for ld_dpo
    reference: torch.Tensor | None,   # the reference's, same shape, or None (simpo)
    lengths: torch.Tensor,            # [P, 2] scored tokens per side
    kind: LossKind,
    beta: float,
    gamma: float = 0.0,
    options: LossOptions | None = None,
    label: torch.Tensor | None = None,  # [P] kto: > 0 desirable, else undesirable
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss [P], rewards [P, 2]) for one of the variants in the module docstring.

    For ld_dpo the last axis of `policy` and `reference` holds (full sum, shared-length sum), as
    `sequence_logps(..., shared=True)` returns them.
    """
    opt = options or LossOptions(gamma=gamma)
    if kind == "simpo":
        rewards = beta * policy / lengths.clamp(min=1)
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - opt.gamma), rewards
    if reference is None:
        raise ValueError(f"loss '{kind}' needs reference log-probs")
    if kind == "ld_dpo":
        policy, reference = desensitise(policy, opt.ld_alpha), desensitise(reference, opt.ld_alpha)
    ratio = policy - reference
    rewards = beta * ratio
    if kind in ("dpo", "ld_dpo"):
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards
    if kind == "rdpo":
        length_gap = lengths[:, 0] - lengths[:, 1]
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - opt.length_alpha * length_gap), rewards
    if kind == "ipo":
        h = ratio[:, 0] - ratio[:, 1]
        return (h - 1.0 / (2.0 * beta)) ** 2, rewards
    if kind == "kto":
        if label is None:
            raise ValueError("loss 'kto' needs a label per answer")
        # The reference point: how far the policy has drifted on answers that do not belong to
        # their prompt, a batch-level KL estimate; no gradient flows through it, as in the paper.
        z = ratio[:, 1].detach().mean().clamp(min=0)
        desirable = label > 0
        value = torch.where(desirable, ratio[:, 0] - z, z - ratio[:, 0])
        weight = torch.where(desirable, torch.full_like(value, opt.desirable_weight),
                             torch.full_like(value, opt.undesirable_weight))
        return weight * (1 - torch.sigmoid(beta * value)), rewards
    raise ValueError(f"unknown preference loss '{kind}'")


def sequence_logps(module: torch.nn.Module, batch: PairBatch, shared: bool = False) -> torch.Tensor:
    """[P, 2] summed log-probs of each pair's chosen and rejected response.

    Both sides of every pair go through one forward, as documents of packed rows; attention runs
    per document (`segments`), so no dense [B, 1, L, L] mask is built and no query scores a key
    of another side or pair (see `TokenLogprobs`).

    With `shared`, [P, 2, 2]: (the full sum, the sum over the side's first min(|chosen|,
    |rejected|) scored tokens), what LD-DPO splits a side into.
    """
    pk = batch.packed
    select = pk.loss_mask
    logp = module(pk.input_ids, pk.position_ids, None, select, pk.targets[select], segments=pk.doc_ids)
    sums = torch.zeros(2 * batch.n_pairs, dtype=logp.dtype, device=logp.device).index_add_(0, batch.seq, logp)
    if not shared:
        return sums.view(batch.n_pairs, 2)
    # Scored tokens come sequence after sequence (`batch.seq` is sorted), so a token's place in its
    # response is its index minus where its sequence starts.
    per_side = batch.lengths.flatten().long().to(logp.device)
    starts = torch.cumsum(per_side, 0) - per_side
    seq = batch.seq.to(logp.device)
    place = torch.arange(seq.numel(), device=logp.device) - starts[seq]
    common = batch.lengths.min(dim=1).values.long().to(logp.device)
    in_common = place < common[seq // 2]
    prefix = torch.zeros_like(sums).index_add_(0, seq, torch.where(in_common, logp, torch.zeros_like(logp)))
    return torch.stack([sums, prefix], dim=-1).view(batch.n_pairs, 2, 2)


class PreferenceObjective:
    """The loop's Objective for every variant: weight = pairs, loss = sum of weighted pair losses."""

    def __init__(self, kind: LossKind, beta: float, gamma: float = 0.0, options: LossOptions | None = None) -> None:
        self.kind, self.beta = kind, beta
        self.options = options or LossOptions(gamma=gamma)
        self.gamma = self.options.gamma

    def weight(self, batch: PairBatch) -> float:
        return float(batch.n_pairs)

    def loss(self, module: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        split = self.kind == "ld_dpo"
        logps = sequence_logps(module, batch, shared=split)
        losses, rewards = preference_loss(logps, batch.reference, batch.lengths, self.kind, self.beta,
                                          options=self.options, label=batch.label)
        policy = logps[..., 0] if split else logps
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
        if self.kind == "kto" and batch.label is not None:
            stats["desirable_sum"] = float((batch.label > 0).sum())
        return (losses * batch.weight).sum(), stats


# --- reference log-probs -----------------------------------------------------------------------


def _reference_forward(module: torch.nn.Module, batch: PairBatch, shared: bool = False) -> torch.Tensor:
    """One forward of the frozen reference over a batch (tests count these)."""
    return sequence_logps(module, batch, shared=shared)


def compute_reference(module: torch.nn.Module, pairs: Sequence[TokenizedPair], micro_batch: int, row_len: int,
                      pad_id: int, device: torch.device, bf16: bool, packing: bool = True,
                      shared: bool = False) -> torch.Tensor:
    """[len(pairs), 2] reference log-probs, pair i in row `pairs[i].index`; weights and RNG untouched.

    With `shared`, [len(pairs), 2, 2] (full sum, shared-length sum; see `sequence_logps`).
    For a LoRA model the adapters are switched off during the pass: the reference is the base model.
    """
    table = torch.full((len(pairs), 2, 2) if shared else (len(pairs), 2), math.nan, dtype=torch.float32)
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
                batch = batches[i].to(device)
                logps = _reference_forward(module, batch, shared=True) if shared else _reference_forward(module, batch)
                table[index] = logps.float().cpu()
                bar.update(task, advance=1)
    finally:
        module.train(was_training)
    if torch.isnan(table).any():
        raise RuntimeError("reference pass left pairs without log-probs")  # a bug, not bad input
    return table


def cached_reference(module: torch.nn.Module, pairs: Sequence[TokenizedPair], model: ModelSection,
                     cfg: DPOTrainSection, pad_id: int, path: Path) -> torch.Tensor | None:
    """The reference log-probs of `pairs` (None for simpo): from the cache at `path`, else computed.

    The cache is keyed by the model, the tokens, the precision and its shape (ld_dpo keeps the
    shared-length sums too; alpha is applied at train time, so one cache serves every alpha).
    Under torchrun rank 0 computes and writes it; the others then find it there and read it
    (expert-parallel: all compute it together, since every forward exchanges tokens).
    """
    if cfg.loss == "simpo":
        return None
    device = next(module.parameters()).device
    shared = cfg.loss == "ld_dpo"
    # version 2: per-document attention (the policy's forward must match the reference's exactly)
    fingerprint = config_hash({"model": model_fingerprint(model), "tokens": pairs_digest(pairs),
                               "bf16": cfg.bf16, "device": device.type, "version": 2,
                               **({"shared": True} if shared else {})})
    # Expert-parallel forwards are collective: then every process computes (rank 0 still writes).
    with contextlib.nullcontext() if expert_parallel.active(module) else dist.main_first():
        return load_or_compute(path, fingerprint, lambda: {"logps": compute_reference(
            module, pairs, cfg.micro_batch, 2 * cfg.max_seq_len, pad_id, device, cfg.bf16, cfg.packing, shared)},
            "reference log-probs")["logps"]


def loss_options(cfg: DPOTrainSection) -> LossOptions:
    return LossOptions(gamma=cfg.gamma, ld_alpha=cfg.ld_alpha, length_alpha=cfg.length_alpha,
                       desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)


def pair_batches(train: Sequence[TokenizedPair], held_out: Sequence[TokenizedPair], cfg: DPOTrainSection,
                 pad_id: int, reference: torch.Tensor | None) -> tuple[PairBatches, Sequence[PairBatch]]:
    """(the training batches of every epoch, the held-out batches): rows of up to 2 x max_seq_len."""
    row_len = 2 * cfg.max_seq_len
    batches = PairBatches(train, row_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id, packing=cfg.packing,
                          reference=reference)
    eval_batches = PairBatches(held_out, row_len, cfg.micro_batch, pad_id=pad_id, packing=cfg.packing,
                               shuffle=False, reference=reference)(0) if held_out else ()
    return batches, eval_batches
