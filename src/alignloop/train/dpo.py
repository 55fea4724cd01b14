"""`alignloop train dpo RECIPE`: preference optimisation from (prompt, chosen, rejected) pairs.

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

Output in runs/<run>/dpo/: model/ (merged HF checkpoint), checkpoints/, metrics.jsonl,
reference_logps.safetensors, manifest.json.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from alignloop.recipes import ExistingFile, Section, recipe_to_dict
from alignloop.runs import Stage, config_hash, default_run_name
from alignloop.sections import ModelSection, RunSection
from alignloop.train import dist
from alignloop.train.cache import load_or_compute, local_model_files, model_identity
from alignloop.train.config import TrainSection
from alignloop.train.context import check_fits_context
from alignloop.train.dpo_data import (
    PairBatch,
    PairBatches,
    TokenizedPair,
    limit_pairs,
    pairs_digest,
    read_pairs,
    split_pairs,
    tokenize_pairs,
)
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.loop import (
    LoopResult,
    StepCallback,
    autocast,
    evaluate,
    pick_device,
    train,
)
from alignloop.train.lora import add_lora, fresh_model, is_lora, merged
from alignloop.ui import progress, say

LossKind = Literal["dpo", "ipo", "simpo"]
REFERENCE_FILE = "reference_logps.safetensors"
_DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}


class DPODataSection(Section):
    path: ExistingFile = Field(description="JSONL or Parquet pairs: prompt, chosen, rejected, weight?, user_id?")


class DPOTrainSection(TrainSection):
    loss: LossKind = Field("dpo", description="dpo (sigmoid), ipo (squared), simpo (reference-free)")
    beta: float = Field(None, gt=0, description="reward scale; default 0.1 for dpo/ipo, 2.0 for simpo")  # type: ignore[assignment]
    gamma: float = Field(0.5, ge=0, description="simpo: target reward margin")
    max_seq_len: int = Field(1024, ge=8, description="tokens of prompt + response per side; longer pairs are skipped")
    packing: bool = Field(True, description="several pairs per row (up to 2 x max_seq_len tokens), isolated")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of users (stable hash) held out")
    split_salt: str = Field("dpo-split", description="changes which users land in eval")
    max_train_pairs: int | None = Field(None, ge=1, description="train on at most this many pairs (a seeded draw); "
                                        "the reference pass covers only the pairs used")
    max_eval_pairs: int | None = Field(None, ge=1, description="held-out pairs scored at eval, at most")

    @model_validator(mode="before")
    @classmethod
    def _default_beta(cls, data: Any) -> Any:
        # The scale that suits a variant differs by an order of magnitude: default it per variant.
        if isinstance(data, dict) and data.get("beta") is None:
            data = {**data, "beta": _DEFAULT_BETA.get(data.get("loss", "dpo"), 0.1)}
        return data


class DPORecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DPODataSection
    train: DPOTrainSection = DPOTrainSection()


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
                index = torch.tensor([p.index for p in batches.pairs(i)], dtype=torch.long)
                table[index] = _reference_forward(module, batches[i].to(device)).float().cpu()
                bar.update(task, advance=1)
    finally:
        module.train(was_training)
    if torch.isnan(table).any():
        raise RuntimeError("reference pass left pairs without log-probs")  # a bug, not bad input
    return table


# --- the run -----------------------------------------------------------------------------------


def run_dpo(recipe: DPORecipe, run: str | None = None, force: bool = False,
            callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Train, write runs/<run>/dpo/, return the stage; a finished stage with the same inputs is skipped.

    Under torchrun every process runs this with the same recipe; rank 0 alone writes (the
    reference cache, metrics, checkpoints, the model, the manifest), the others read the
    reference rank 0 computed (see `alignloop.train.dist`).
    """
    from alignloop.models import load_model
    from alignloop.train.sft import final_model, save_model

    cfg = recipe.train
    ctx = dist.init_from_env()  # under torchrun: join the process group; else a world of one
    run = dist.broadcast_object(run or recipe.run.name or default_run_name())  # one name for all processes
    # A model given as a folder (e.g. the SFT stage's model/) is an input: retraining it reruns DPO.
    stage = Stage(recipe.run.dir, run, "dpo", recipe_to_dict(recipe),
                  inputs=[recipe.data.path, *local_model_files(recipe.model.name)])
    if dist.broadcast_object(not force and ctx.is_main and stage.is_complete()):
        say(f"[green]dpo: up to date[/] ({stage.dir}), skipped")
        return stage
    if ctx.is_main:
        stage.start()

    dtype = "float32" if recipe.model.dtype == "auto" else recipe.model.dtype
    with dist.main_first():  # a first load converts into the cache: once, not racing
        model, tokenizer = load_model(recipe.model.name, dtype=dtype, seed=recipe.model.seed)
    check_fits_context(model, cfg.max_seq_len)  # per side: both sides of a pair restart their positions
    pairs, counts = tokenize_pairs(tokenizer, read_pairs(recipe.data.path), cfg.max_seq_len)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.split_salt)
    pairs, train_pairs, eval_pairs = limit_pairs(train_pairs, eval_pairs, cfg.max_train_pairs, cfg.max_eval_pairs,
                                                 cfg.seed)
    if cfg.eval_fraction > 0 and not eval_pairs:
        say("[yellow]warning: no pair landed in the eval split: no held-out accuracy will be reported[/]")
    pad_id = tokenizer.pad_token_id or 0
    row_len = 2 * cfg.max_seq_len
    say(f"dpo ({cfg.loss}, beta {cfg.beta:g}): {len(train_pairs)} train / {len(eval_pairs)} eval pairs, "
        f"{counts.response_tokens} response tokens of {counts.tokens}")

    torch.manual_seed(cfg.seed)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    device = pick_device(cfg.device)
    model.to(device)
    module = TokenLogprobs(model)

    reference = None
    if cfg.loss != "simpo":
        # version 2: per-document attention (the policy's forward must match the reference's exactly)
        fingerprint = config_hash({"model": model_identity(recipe.model), "tokens": pairs_digest(pairs),
                                   "bf16": cfg.bf16, "device": device.type, "version": 2})
        # Rank 0 computes and writes the cache; the others then find it there and read it.
        with dist.main_first():
            reference = load_or_compute(stage.path(REFERENCE_FILE), fingerprint, lambda: {"logps": compute_reference(
                module, pairs, cfg.micro_batch, row_len, pad_id, device, cfg.bf16, cfg.packing)},
                "reference log-probs")["logps"]

    batches = PairBatches(train_pairs, row_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id,
                          packing=cfg.packing, reference=reference)
    eval_batches = PairBatches(eval_pairs, row_len, cfg.micro_batch, pad_id=pad_id, packing=cfg.packing,
                               shuffle=False, reference=reference)(0) if eval_pairs else ()
    objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.gamma)
    # The held-out numbers of the starting model (the loop has no step-0 eval; the checkpoint, if
    # any, is only loaded inside `train`, so this is always the initial model, resumed or not).
    baseline = evaluate(module, objective, eval_batches, device, cfg.bf16) if eval_batches else {}
    if baseline:
        say(f"dpo: starting model's held-out log-prob preference accuracy {baseline['eval_logp_accuracy']:.3f}")
    result = train(module, objective, batches, cfg, stage, eval_batches=eval_batches, callbacks=callbacks,
                   description="dpo")

    dist.reshard(module)  # FSDP2: every parameter back to its shard before gathering (from the root)
    final = final_model(model, lambda: fresh_model(recipe.model.name, recipe.model.seed, recipe.train.lora, dtype))
    if ctx.is_main:
        outputs = save_model(merged(final), tokenizer, stage.path("model"))
        if reference is not None:
            outputs.append(stage.path(REFERENCE_FILE))
        stage.finish(outputs, extra={"data": {**counts.as_dict(), "train_pairs": len(train_pairs),
                                              "eval_pairs": len(eval_pairs)},
                                     "baseline": baseline, "train": _summary(result), "processes": ctx.world})
    dist.barrier()
    ev = result.eval
    say(f"[green]dpo: {result.steps} steps[/]"
        + (f", loss {result.last['loss']:.4f}" if "loss" in result.last else "")
        + (f", held-out accuracy {ev['eval_accuracy']:.3f} margin {ev['eval_margin']:.3f} on {len(eval_pairs)} pairs"
           if "eval_accuracy" in ev else "")
        + f" -> {stage.path('model')}")
    return stage


def _summary(result: LoopResult) -> dict[str, Any]:
    keep = ("loss", "accuracy", "logp_accuracy", "margin", "rewards/chosen", "rewards/rejected")
    return {"steps": result.steps, "resumed_from": result.resumed_from, "tokens": result.tokens,
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            **{k: v for k, v in result.last.items() if k in keep}, **result.eval}
