"""LoRA via peft: add adapters for training, fold them back in for a plain HF checkpoint.

A LoRA run trains ~1% of the weights: the optimizer state and the checkpoints shrink by that much,
and on a CPU the backward pass skips every weight gradient of the frozen base. The final model
is merged, so the engine and every later stage load it like any other checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model

from alignloop.models import load_model
from alignloop.train.config import LoraSection


def add_lora(model: torch.nn.Module, lora: LoraSection) -> torch.nn.Module:
    """Wrap `model` with fresh adapters (initialised from torch's RNG: seed before calling)."""
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.targets,
        task_type="CAUSAL_LM",
        bias="none",
    )
    with warnings.catch_warnings():
        # peft calls a transformers API that 5.x deprecates; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def fresh_model(name: str, seed: int, lora: LoraSection | None, dtype: str) -> torch.nn.Module:
    """The model as a trainer starts it (zoo `name`, plus fresh adapters when `lora` is set): the
    copy FSDP2 gathers its shards into before saving (see `alignloop.train.session.final_model`)."""
    model, _ = load_model(name, dtype=dtype, seed=seed)
    return add_lora(model, lora) if lora is not None else model


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers model with any adapters folded into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")
