"""The trainer skeleton: the steps every trainer takes around its objective, as plain functions.

A trainer (SFT, DPO, distillation, and the pieces the RL trainer shares) is its data and its
`Objective` (see `loop`); everything else is here, called in this order:

    def run_mine(recipe: MyRecipe, run=None, force=False, callbacks=()) -> Stage:
        cfg = recipe.train
        stage, done = session.open_stage(recipe, "mine", run, force, inputs=[recipe.data.path])
        if done:                                       # up to date: said so, nothing to do
            return stage
        model, tokenizer = session.load_base_model(recipe.model)   # fp32 master weights
        batches, eval_batches = my_data(tokenizer, recipe)          # epoch -> micro batches
        model = session.make_trainable(model, cfg)     # seeded LoRA adapters (or all weights), device
        module = TokenLogprobs(model)                  # what the objective calls
        result = train(module, MyObjective(), batches, cfg, stage, eval_batches=eval_batches,
                       callbacks=callbacks, description="mine")   # resumes, logs, checkpoints
        session.finish(stage, module, model, tokenizer, recipe.model, cfg,
                       extra={"train": session.summarise(result, ("loss",))})
        session.report("mine", result, stage)
        return stage

`train` (the loop) resumes from the newest checkpoint of the same config (`resume`), logs every
step through `MetricLog` (metrics.jsonl plus the trackers in `train.track`) and checkpoints every
`save_every` steps. A loop of its own (the RL trainer) calls `resume` with a loader of its own
and `MetricLog` itself.

Under torchrun every process calls every function with the same arguments: they join the process
group, agree on the run name and on skipping, load the model one process at a time (a first load
converts it into the cache), and only rank 0 writes the model and the manifest.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from alignloop.models import load_model
from alignloop.models.fingerprint import local_model_files
from alignloop.recipes import recipe_to_dict
from alignloop.runs import Stage, default_run_name
from alignloop.sections import ModelSection
from alignloop.train import dist
from alignloop.train.checkpoint import disk_full_is_an_error_here, resume
from alignloop.train.config import LoraSection
from alignloop.train.loop import LoopResult, pick_device, train
from alignloop.train.lora import add_lora, fresh_model, merged
from alignloop.train.metrics import MetricLog
from alignloop.ui import say

__all__ = ["MetricLog", "final_model", "finish", "load_base_model", "make_trainable", "master_dtype",
           "open_stage", "report", "resume", "save_model", "summarise", "train"]


def open_stage(recipe: Any, name: str, run: str | None = None, force: bool = False,
               inputs: Sequence[str | Path] = ()) -> tuple[Stage, bool]:
    """(the stage runs/<run>/<name>/ of `recipe`, whether it is up to date and the caller returns).

    Joins the torchrun process group if there is one; every process gets one run name (rank 0's:
    a timestamp could differ between processes by a second) and rank 0's verdict on skipping.
    Not up to date: the stage is started (rank 0). `inputs`: files whose change reruns the stage;
    the starting model's files are added here when it is a folder (e.g. the SFT stage's model/ that
    DPO or RL start from), so retraining it in place reruns every stage built on it.
    """
    ctx = dist.init_from_env()
    run = dist.broadcast_object(run or recipe.run.name or default_run_name())
    model = getattr(recipe, "model", None)
    inputs = [*inputs, *(local_model_files(model.name) if model is not None else [])]
    stage = Stage(recipe.run.dir, run, name, recipe_to_dict(recipe), inputs=inputs)
    return stage, stage.skip_if_complete(force, main=ctx.is_main, agree=dist.broadcast_object)


def master_dtype(section: ModelSection) -> str:
    """The dtype weights train in: fp32 unless the recipe says otherwise (bf16 comes from autocast)."""
    return "float32" if section.dtype == "auto" else section.dtype


def load_base_model(section: ModelSection) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of `section` in its master dtype, on the CPU, before any adapter."""
    with dist.main_first():  # a first load converts into the cache: once, not racing
        return load_model(section.name, dtype=master_dtype(section), seed=section.seed)


def make_trainable(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """`model` with fresh LoRA adapters (`cfg.lora`) or every weight trainable, on `cfg.device`.

    The adapters are drawn from torch's RNG, seeded here with `cfg.seed` so that a run is
    reproducible. `cfg`: any section with `lora`, `device` and `seed` (train's, rl's).
    """
    torch.manual_seed(cfg.seed)
    fp8 = getattr(cfg, "fp8", "off")
    if fp8 == "qat":  # before LoRA: the adapters' base layers are then the fake-quantised ones
        from alignloop.fp8.qat import fake_quantize_model

        say(f"fp8 qat: {fake_quantize_model(model)} projections train against e4m3 rounding")
    elif fp8 == "torchao":
        from alignloop.fp8.qat import torchao_float8

        model = torchao_float8(model)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    return model.to(pick_device(cfg.device))


def final_model(model: torch.nn.Module, fresh: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
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
    """Write an HF checkpoint folder (safetensors + tokenizer) atomically; return its files.

    A full disk is one line (`DiskFullError`) naming `folder`; an earlier `folder` stays as it was.
    """
    tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}.tmp")
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar would break our console
    try:
        with disk_full_is_an_error_here(folder):
            model.to("cpu").save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
    finally:
        hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(p for p in folder.rglob("*") if p.is_file())


def finish(stage: Stage, module: torch.nn.Module, model: torch.nn.Module, tokenizer: Any, section: ModelSection,
           cfg: Any, *, extra: dict[str, Any], outputs: Sequence[Path] = ()) -> None:
    """Save the trained model to the stage's model/ (adapters merged) and write its manifest.

    Collective under torchrun: FSDP2 shards are resharded and gathered (into a fresh copy of
    `section`'s model with `cfg.lora`'s adapters), rank 0 writes, every process waits for it.
    `outputs`: the stage's other files the manifest vouches for (caches, generations).
    """
    dist.reshard(module)  # FSDP2: every parameter back to its shard before gathering (from the root)
    lora: LoraSection | None = cfg.lora
    final = final_model(model, lambda: fresh_model(section.name, section.seed, lora, master_dtype(section)))
    if dist.is_main():
        files = save_model(merged(final), tokenizer, stage.path("model"))
        stage.finish([*files, *outputs], extra={**extra, "processes": dist.context().world})
    dist.barrier()


def summarise(result: LoopResult, keep: Sequence[str] = ("loss",)) -> dict[str, Any]:
    """The manifest's "train" entry: counts, speed, the last step's `keep` metrics, the last eval."""
    return {"steps": result.steps, "resumed_from": result.resumed_from, "tokens": result.tokens,
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            **{k: v for k, v in result.last.items() if k in keep}, **result.eval}


def report(label: str, result: LoopResult, stage: Stage, detail: str | None = None) -> None:
    """The run's last console line: steps, final loss, `detail` (default: the eval loss), the model."""
    if detail is None:
        detail = f", eval loss {result.eval['eval_loss']:.4f}" if "eval_loss" in result.eval else ""
    say(f"[green]{label}: {result.steps} steps[/]"
        + (f", loss {result.last['loss']:.4f}" if "loss" in result.last else "")
        + detail + f" -> {stage.path('model')}")
