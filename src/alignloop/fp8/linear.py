"""Weight-only FP8 for serving (on a GPU with FP8 and Triton, the fused kernel instead): projections kept in e4m3 with their block scales (1 byte per
weight plus 4 bytes per 128 x 128 block), dequantised into one shared buffer right before each matmul.

CPUs without FP8 matmul units (this one: AVX-512 BF16, no AMX-FP8) cannot multiply e4m3 directly;
what FP8 buys here is memory: a model's projection weights take half their bf16 bytes while
resident, and the dequantised copy exists for one projection at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignloop.fp8 import triton_linear
from alignloop.fp8.blockwise import BLOCK


_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # code -> value


class Fp8Linear:
    """y = x @ W.T (+ b) for W = the row-wise concatenation of fp8 `parts` [(q [n_i, K], scale_inv)].

    A fused projection (q|k|v, gate|up) stays as its checkpoint's separate tensors: their 128-row
    blocks need not line up with the fused matrix's (a 64-row k_proj would share a block with q_proj).
    """

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                 scratch: dict[tuple[int, int], torch.Tensor], bias: torch.Tensor | None = None,
                 block: int = BLOCK) -> None:
        self.block = block
        self.stored = parts  # as in the checkpoint: what the fused GPU kernel takes
        self.parts = [(q.contiguous(), s.float().repeat_interleave(block, 0)[: q.shape[0]].contiguous())
                      for q, s in parts]
        self.rows = sum(q.shape[0] for q, _ in parts)
        self.cols = parts[0][0].shape[1]
        self.dtype, self.bias, self.scratch = dtype, bias, scratch

    def weight(self) -> torch.Tensor:
        """The dequantised weight, in the shared buffer for this shape (valid until the next call)."""
        key = (self.rows, self.cols)
        w = self.scratch.get(key)
        if w is None:
            w = self.scratch[key] = torch.empty(key, dtype=self.dtype)
        row = 0
        b = self.block
        for q, row_scales in self.parts:  # row_scales [n, ceil(K / b)]: each row's block scales
            n, K = q.shape
            # A 256-entry table, not `q.float()`: torch's e4m3 cast runs at ~4 ns per element on this
            # CPU (7.1 ms for a 3072 x 576 weight); the table lookup takes 1.3 ms, exact for every code.
            vals = _E4M3.index_select(0, q.view(torch.uint8).reshape(-1).int()).view(n, K)
            if K % b == 0:
                vals.view(n, K // b, b).mul_(row_scales[:, :, None])
            else:
                for kb in range(math.ceil(K / b)):
                    vals[:, kb * b:(kb + 1) * b] *= row_scales[:, kb:kb + 1]
            # The product in fp32, one rounding to the serving dtype: a bf16 scale alone would be
            # off by up to 0.4%.
            w[row:row + n].copy_(vals)
            row += n
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.block == BLOCK and self.cols % BLOCK == 0 and triton_linear.available():
            # The real FP8 GEMM where the hardware has it: no dequantised weight at all.
            y = torch.cat([triton_linear.fp8_linear(x, q, s) for q, s in self.stored], dim=-1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight(), self.bias)

    @property
    def nbytes(self) -> int:
        """Resident bytes: the fp8 values and the scales, kept per row (4 bytes per row per block of
        columns: 3-6% of a row, for one multiply per block instead of a gather)."""
        return sum(q.numel() + s.numel() * 4 for q, s in self.parts)
