"""LoRA via peft: add adapters for training, fold them back in for a plain HF checkpoint.

A LoRA run trains ~1% of the weights: the optimizer state and the checkpoints shrink by that much,
and on a CPU the backward pass skips every weight gradient of the frozen base. The final model
is merged, so the engine and every later stage load it like any other checkpoint.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import transformers_weight_conversion

from alignloop.models import load_model
from alignloop.models.deepseek import DeepseekForCausalLM
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
    with warnings.catch_warnings(), _no_v4_moe_remap(model):
        # peft calls a transformers API that 5.x deprecates; the warning is theirs, not the user's.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


@contextlib.contextmanager
def _no_v4_moe_remap(model: torch.nn.Module) -> Iterator[None]:
    """For our DeepSeek-style model, skip peft's remap of MoE targets from transformers 4 to 5 names.

    peft rewrites the targets of a `deepseek_v3` model as if its adapters came from a transformers 4
    checkpoint: every Linear named gate_proj/up_proj/down_proj (here the shared experts' and the dense
    layers') becomes the fused routed-expert tensors, and the router `gate` becomes a wrapped
    parameter, whose module then loses its own methods (`gate.scores`). Our model never had a 4.x
    layout, so "all-linear" means what it says: every Linear (MLA projections, shared experts, dense
    FFNs); the routed experts' fused tensors and the router stay frozen (full fine-tuning trains them).
    """
    if not isinstance(model, DeepseekForCausalLM):
        yield
        return
    convert = transformers_weight_conversion.convert_peft_config_for_transformers
    transformers_weight_conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        transformers_weight_conversion.convert_peft_config_for_transformers = convert


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
