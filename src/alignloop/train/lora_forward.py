"""A leaner forward for peft's LoRA linear layers, used while our trainers run the model.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: after the two matmuls, one elementwise
pass scales the adapter's [tokens, out] output and another adds it to the base output, and the
backward scales the gradient once more. Folding the scale into B (a [out, r] matrix, not the
[tokens, out] activations) and the add into the second matmul (`addmm` accumulates into the base
output) computes the same function with none of those passes:

    base(x) + (dropout(x) @ A^T) @ (scaling * B)^T

With alpha / r a power of two (LoRA's usual 2) the scale is exact in any float format; the only
difference is rounding: the adapter's product is added to the base output before it is rounded
to bf16, not after. Measured on SmolLM2-135M's seven adapted projections of one layer, 2048
tokens, bf16 autocast, 1 thread: ~6% less CPU time forward and backward.

Only plain LoRA layers take this path, in the states where it is exactly peft's function: one
active adapter, not merged, adapters enabled, no variant (DoRA, ...), no LoRA bias, and either
autocast on or the input, base and adapter all in one dtype. Every other call goes to peft.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear


def fused_forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`layer`'s output, as peft's `Linear.forward` computes it (see the module docstring)."""
    name = _plain_adapter(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.get_base_layer()
    out = base(x)
    h = F.linear(layer.lora_dropout[name](x), layer.lora_A[name].weight)
    scaled_b = layer.lora_B[name].weight * layer.scaling[name]
    return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_b.t()).view(out.shape)


def _plain_adapter(layer: LoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when the fused path computes exactly peft's function, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name, False):
        return None
    if not torch.is_autocast_enabled(x.device.type):
        dtypes = {x.dtype, layer.get_base_layer().weight.dtype, layer.lora_A[name].weight.dtype}
        if len(dtypes) != 1:
            return None  # peft casts between them; keep its exact route
    return name


@contextlib.contextmanager
def fused_lora(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every peft LoRA `Linear` of `model` runs `fused_forward`.

    Autograd keeps what the forward recorded, so the backward after the block is unaffected.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and "forward" not in m.__dict__]
    for m in layers:
        m.forward = types.MethodType(fused_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
