"""`alignloop train sft RECIPE`: supervised fine-tuning on messages-format conversations.

The loss is the mean, over assistant tokens, of each token's cross-entropy times its
conversation's weight: only what the assistant wrote is learned (never the user's turns or the
template's headers), and a conversation with weight 0.5 pulls half as hard as one with 1.0.

Output in runs/<run>/sft/: model/ (the final model as a plain HF checkpoint: safetensors,
config, tokenizer; LoRA adapters merged in), checkpoints/, metrics.jsonl, manifest.json.

Several processes, same recipe, same results (see `alignloop.train.dist`):

    torchrun --nproc_per_node 2 -m alignloop.cli train sft RECIPE [--set train.parallel=fsdp]
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from alignloop.recipes import ExistingFile, Section, recipe_to_dict
from alignloop.runs import Stage, default_run_name
from alignloop.sections import ModelSection, RunSection
from alignloop.train import dist
from alignloop.train.config import TrainSection
from alignloop.train.context import check_fits_context
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.loop import LoopResult, StepCallback, pick_device, train
from alignloop.train.lora import add_lora, fresh_model, merged
from alignloop.train.packing import PackedBatch
from alignloop.train.sft_data import PackedBatches, read_conversations, split, tokenize
from alignloop.ui import say


class SFTDataSection(Section):
    path: ExistingFile = Field(description="JSONL or Parquet: one {'messages': [...], 'weight'?: x} per row")


class SFTTrainSection(TrainSection):
    max_seq_len: int = Field(2048, ge=8, description="tokens per packed row; longer conversations are skipped")
    packing: bool = Field(True, description="several conversations per row, isolated from each other")
    last_turn_only: bool = Field(False, description="loss on the final assistant turn only")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="conversations held out for eval loss")


class SFTRecipe(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: SFTDataSection
    train: SFTTrainSection = SFTTrainSection()


class SFTObjective:
    """Weighted token cross-entropy on the assistant tokens of packed batches."""

    def weight(self, batch: PackedBatch) -> float:
        return float(batch.n_loss_tokens)

    def loss(self, module: torch.nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, float]]:
        select = batch.loss_mask
        # Document ids instead of a dense [B, 1, L, L] mask: attention then runs per conversation.
        logp = module(batch.input_ids, batch.position_ids, None, select, batch.targets[select],
                      segments=batch.doc_ids)
        ce = -logp
        loss = (ce * batch.loss_weight[select]).sum()
        # ce_sum: the unweighted cross-entropy, so the log shows how well it fits whatever the weights.
        return loss, {"ce_sum": float(ce.detach().sum()), "tokens": batch.n_tokens}


def per_token_losses(model: torch.nn.Module, batch: PackedBatch, segments: bool = False) -> torch.Tensor:
    """Cross-entropy of each loss token of `batch`, in row-major order (for tests and inspection).

    segments=False: through the dense block mask; True: per-document attention, as training runs.
    """
    module = model if isinstance(model, TokenLogprobs) else TokenLogprobs(model)
    select = batch.loss_mask
    with torch.no_grad():
        if segments:
            return -module(batch.input_ids, batch.position_ids, None, select, batch.targets[select],
                           segments=batch.doc_ids)
        return -module(batch.input_ids, batch.position_ids, batch.attention_mask(), select, batch.targets[select])


def run_sft(recipe: SFTRecipe, run: str | None = None, force: bool = False,
            callbacks: Sequence[StepCallback] = ()) -> Stage:
    """Train, write runs/<run>/sft/, return the stage; a finished stage with the same inputs is skipped."""
    from alignloop.models import load_model

    cfg = recipe.train
    ctx = dist.init_from_env()  # under torchrun: join the process group; else a world of one
    # One run name for all processes (a timestamp could differ between them by a second).
    run = dist.broadcast_object(run or recipe.run.name or default_run_name())
    stage = Stage(recipe.run.dir, run, "sft", recipe_to_dict(recipe), inputs=[recipe.data.path])
    if dist.broadcast_object(not force and ctx.is_main and stage.is_complete()):
        say(f"[green]sft: up to date[/] ({stage.dir}), skipped")
        return stage
    if ctx.is_main:
        stage.start()

    # Master weights in fp32 unless asked otherwise: bf16 comes from autocast, not from the weights.
    dtype = "float32" if recipe.model.dtype == "auto" else recipe.model.dtype
    with dist.main_first():  # a first load converts into the cache: once, not racing
        model, tokenizer = load_model(recipe.model.name, dtype=dtype, seed=recipe.model.seed)
    check_fits_context(model, cfg.max_seq_len)
    examples, counts = tokenize(tokenizer, read_conversations(recipe.data.path), cfg.max_seq_len,
                                cfg.last_turn_only)
    train_examples, eval_examples = split(examples, cfg.eval_fraction, cfg.seed)
    pad_id = tokenizer.pad_token_id or 0
    batches = PackedBatches(train_examples, cfg.max_seq_len, cfg.micro_batch, seed=cfg.seed, pad_id=pad_id,
                            packing=cfg.packing)
    eval_batches = PackedBatches(eval_examples, cfg.max_seq_len, cfg.micro_batch, pad_id=pad_id,
                                 packing=cfg.packing, shuffle=False)(0) if eval_examples else ()
    say(f"sft: {len(train_examples)} train / {len(eval_examples)} eval conversations, "
        f"{counts.loss_tokens} assistant tokens of {counts.tokens}; {len(batches.rows)} rows "
        f"{batches.fill(cfg.max_seq_len):.0%} full")

    # Adapters are initialised from torch's RNG: seed it so the run is reproducible.
    torch.manual_seed(cfg.seed)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    model.to(pick_device(cfg.device))
    module = TokenLogprobs(model)

    result = train(module, SFTObjective(), batches, cfg, stage, eval_batches=eval_batches,
                   callbacks=callbacks, description="sft")

    dist.reshard(module)  # FSDP2: every parameter back to its shard before gathering (from the root)
    final = final_model(model, lambda: fresh_model(recipe.model.name, recipe.model.seed, recipe.train.lora, dtype))
    if ctx.is_main:
        outputs = save_model(merged(final), tokenizer, stage.path("model"))
        stage.finish(outputs, extra={"data": counts.as_dict(), "train": _summary(result),
                                     "processes": ctx.world})
    dist.barrier()
    last = result.last or {}
    say(f"[green]sft: {result.steps} steps[/]" + (f", loss {last['loss']:.4f}" if "loss" in last else "")
        + (f", eval loss {result.eval['eval_loss']:.4f}" if "eval_loss" in result.eval else "")
        + f" -> {stage.path('model')}")
    return stage


def final_model(model: torch.nn.Module, fresh: Any) -> torch.nn.Module | None:
    """The trained model, whole, on rank 0 (None elsewhere); collective under torchrun.

    DDP and one process: `model` itself. FSDP2: its shards are gathered and loaded into a plain
    copy built by `fresh()` (same architecture and adapters), since a sharded module cannot be
    saved or merged as it is.
    """
    if not any(dist.is_sharded(p) for p in model.parameters()):
        return model if dist.is_main() else None
    state = dist.full_state_dict(model)
    if not dist.is_main():
        return None
    plain = fresh()
    plain.load_state_dict(state, strict=True)
    return plain


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> list[Path]:
    """Write an HF checkpoint folder (safetensors + tokenizer) atomically; return its files."""
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would break our console
    try:
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _summary(result: LoopResult) -> dict[str, Any]:
    return {"steps": result.steps, "resumed_from": result.resumed_from, "tokens": result.tokens,
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            **{k: v for k, v in result.last.items() if k in ("loss", "ce")}, **result.eval}
