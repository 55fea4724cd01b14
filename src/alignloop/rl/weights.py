"""Trainer -> Inference weight sync: the policy's weights under their plain HF names.

With LoRA only the adapted layers change, so only those are sent, each as W + scale * B @ A
(what merging would give) without touching the trainer's model: the engine keeps its own fused
copy and `load_weights` overwrites the matching slices in place. For SmolLM2-135M with adapters on
every linear that is 30 x 7 matrices, ~2 ms of matmul each on a CPU, once per RL step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from alignloop.train.logprobs import causal_lm


def _hf_name(peft_name: str) -> str:
    # peft: base_model.model.<hf path>[.base_layer]; the engine wants the plain HF path.
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


@torch.no_grad()
def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight that training can have changed."""
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and module.active_adapters:
                base = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                yield _hf_name(name) + ".weight", (base.float() + delta.float())
        # Trainable non-adapter parameters (modules_to_save, a trained bias) travel as they are.
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                yield _hf_name(name), p.detach().float()
        return
    for name, p in causal_lm(model).named_parameters():
        if p.requires_grad:
            yield name, p.detach().float()
