"""Quantisation-aware training for FP8 serving: the forward sees each projection weight as it will be
served (quantised to e4m3 in its blocks and dequantised), the backward passes the gradient straight
through to the fp32 master weight.

Which weights: exactly those `alignloop export fp8` quantises (decoder projections, every routed
expert), so the model trains against the rounding it will be served with. Activations stay in the
training dtype: the engine serves FP8 weights only. The class of each such module is swapped for a
subclass whose forward differs and nothing else: parameter names, state dicts, checkpoints and
saved models are those of the plain model.

`train.fp8 = "torchao"` instead converts the linears to torchao's `Float8Linear` (FP8 GEMMs in the
forward and backward, DeepSeek-V3-style mixed precision), which needs a GPU with FP8 tensor cores
(compute capability 8.9+) and the `torchao` package; elsewhere it stops with that message.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from alignloop.errors import AlignloopError
from alignloop.fp8.blockwise import BLOCK, dequantize_weight, quantize_weight
from alignloop.models.deepseek import Experts

_PROJECTION = re.compile(r"layers\.\d+\..*proj[a-z_]*$")


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, block: int) -> torch.Tensor:  # type: ignore[override]
        q, s = quantize_weight(w.detach(), block=block)
        return dequantize_weight(q, s, w.dtype, block=block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def fake_quantize(w: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """w as FP8 serving will see it; the gradient passes through unchanged."""
    return _StraightThrough.apply(w, block)


class QATLinear(nn.Linear):
    fp8_block = BLOCK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.fp8_block), self.bias)


class QATExperts(Experts):
    """Each routed expert's two matrices fake-quantised on their own, as the export stores them."""

    fp8_block = BLOCK

    def forward(self, x, idx, w):
        real = self.gate_up_proj, self.down_proj
        quant = [torch.stack([fake_quantize(m, self.fp8_block) for m in p.unbind(0)]) for p in real]
        try:
            # Swap the tensors in for one call; nn.Module refuses plain tensors as parameters.
            self._parameters["gate_up_proj"], self._parameters["down_proj"] = quant  # type: ignore[assignment]
            return super().forward(x, idx, w)
        finally:
            self._parameters["gate_up_proj"], self._parameters["down_proj"] = real


def fake_quantize_model(model: nn.Module, block: int | None = None) -> int:
    """Swap every exported projection (and routed-expert block) of `model` to its QAT class; returns
    how many modules now train against FP8 rounding. `block`: as the export will pick it by default
    (128, or less where a dimension is not a multiple of 128)."""
    from alignloop.fp8.checkpoint import largest_block

    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is nn.Linear and _PROJECTION.search(name)) or type(m) is Experts]
    if block is None:
        block = largest_block({d for _, m in targets for p in m.parameters(recurse=False) if p.dim() >= 2
                               for d in p.shape[-2:]})
    n = 0
    for name, module in targets:
        if type(module) is nn.Linear and _PROJECTION.search(name):
            module.__class__ = QATLinear
        elif type(module) is Experts:
            module.__class__ = QATExperts
        else:
            continue
        module.fp8_block = block
        n += 1
    if n == 0:
        raise AlignloopError("train.fp8 = 'qat' found no projection to quantise in this model")
    return n


def torchao_float8(model: nn.Module) -> nn.Module:
    """torchao's FP8 training linears; a clear stop where the hardware or the package is missing."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise AlignloopError("train.fp8 = 'torchao' needs a GPU with FP8 tensor cores (compute capability 8.9+, "
                             "e.g. H100, L4, RTX 4090); use train.fp8 = 'qat' on this machine")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise AlignloopError("train.fp8 = 'torchao' needs the torchao package: pip install torchao") from None
    return convert_to_float8_training(model)
