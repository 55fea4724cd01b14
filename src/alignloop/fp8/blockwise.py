"""Block-wise FP8 (e4m3) quantisation as DeepSeek-V3 trains and serves it, in plain torch.

Weights: 128 x 128 blocks (out x in), one fp32 scale per block, `scale_inv` [ceil(N/128), ceil(K/128)]
(the name checkpoints use; the value is the *dequantisation* multiplier, W ~= W_q * s).
Activations: 1 x 128 tiles, one scale per token per 128 channels, computed on the fly.

Rounding and clamping follow DeepGEMM's reference functions, so the bytes match theirs:
amax per block, clamped below at 1e-4 (an all-zero block would divide by zero), s = amax / 448,
q = fp8(x * (448 / amax)); with power-of-two scales (`pow2`, DeepSeek-V3.1's "ue8m0"),
s = 2^ceil(log2(amax / 448)) and q = fp8(x * (1 / s)). A block's edge that does not fill 128 is
padded with zeros before its amax is taken (zeros never raise an amax).

Error bound (what the property tests check): e4m3 keeps 3 mantissa bits, so a value whose
magnitude lands in e4m3's normal range [2^-6, 448] after scaling is within 2^-4 (6.25%) of itself
relative, and one in the subnormal range (below 2^-6, spacing 2^-9) within 2^-10 absolute; in the
block's units that is |x - deq(q(x))| <= max(|x| / 16, s / 1024).

The GEMM accumulates each 128-wide slice of K in fp32 and applies that slice's two scales before
adding it to the fp32 total: DeepSeek's "promotion every N_C = 128" (its H800 tensor cores keep
~14 bits in an FP8 accumulation, up to 2% error at K = 4096 without it).
"""

from __future__ import annotations

import math

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
_AMAX_FLOOR = 1e-4


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = amax / FP8_MAX
    return torch.pow(2.0, torch.ceil(torch.log2(s))) if pow2 else s


def _cast(x: torch.Tensor, amax: torch.Tensor, scale: torch.Tensor, pow2: bool) -> torch.Tensor:
    # Multiply by 448 / amax, as DeepGEMM does, not divide by the scale: the two round differently.
    return (x * (1.0 / scale if pow2 else FP8_MAX / amax)).to(FP8)


def quantize_weight(w: torch.Tensor, block: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scale_inv [ceil(N/block), ceil(K/block)])."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight takes a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    nb, kb = math.ceil(N / block), math.ceil(K / block)
    padded = w.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:N, :K] = w.float()
    view = padded.view(nb, block, kb, block)
    amax = view.abs().amax(dim=(1, 3), keepdim=True).clamp(min=_AMAX_FLOOR)
    scale = _scale(amax, pow2)
    q = _cast(view, amax, scale, pow2).view(nb * block, kb * block)[:N, :K].contiguous()
    return q, scale.view(nb, kb)


def dequantize_weight(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = BLOCK) -> torch.Tensor:
    """fp8 [N, K] and its block scales -> the weight in `dtype` (each block times its scale)."""
    N, K = q.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:N].repeat_interleave(block, 1)[:, :K]
    return (q.float() * s).to(dtype)


def quantize_activation(x: torch.Tensor, tile: int = BLOCK, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (fp8 [..., K], fp32 scales [..., ceil(K/tile)]): one scale per token per tile."""
    K = x.shape[-1]
    kb = math.ceil(K / tile)
    padded = x.float()
    if kb * tile != K:
        padded = torch.nn.functional.pad(padded, (0, kb * tile - K))
    view = padded.reshape(*x.shape[:-1], kb, tile)
    amax = view.abs().amax(dim=-1, keepdim=True).clamp(min=_AMAX_FLOOR)
    scale = _scale(amax, pow2)
    q = _cast(view, amax, scale, pow2).reshape(*x.shape[:-1], kb * tile)[..., :K].contiguous()
    return q, scale.squeeze(-1)


def dequantize_activation(q: torch.Tensor, scales: torch.Tensor, tile: int = BLOCK) -> torch.Tensor:
    K = q.shape[-1]
    return q.float() * scales.float().repeat_interleave(tile, dim=-1)[..., :K]


def blockwise_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor,
                   out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """C = A B^T from fp8 A [..., K] (tile scales [..., K/128]) and fp8 B [N, K] (block scales
    [N/128, K/128]): per 128-wide K slice kb, the fp32 product of the slices times
    a_scales[m, kb] * b_scale_inv[n // 128, kb], summed over kb in fp32.

    On CPU the slice products run as fp32 matmuls of the fp8 values (exact: every e4m3 value is an
    fp32 value, and a 128-term dot product of them is exact to fp32 rounding), which is what a
    tensor core's fp8 MMA with fp32 promotion computes.
    """
    lead, K = a.shape[:-1], a.shape[-1]
    N = b.shape[0]
    a2 = a.reshape(-1, K).float()
    a_s = a_scales.reshape(-1, a_scales.shape[-1]).float()
    b2 = b.float()
    b_s = b_scale_inv.float().repeat_interleave(block, 0)[:N]  # [N, K/128]: each row's block scales
    out = torch.zeros(a2.shape[0], N, dtype=torch.float32, device=a.device)
    for kb, k0 in enumerate(range(0, K, block)):
        part = a2[:, k0:k0 + block] @ b2[:, k0:k0 + block].T
        out += part * a_s[:, kb:kb + 1] * b_s[:, kb][None, :]
    return out.to(out_dtype).reshape(*lead, N)


def error_bound(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| e4m3 allows, element-wise (see the module docstring)."""
    return torch.maximum(x.abs() / 16, scale_per_element / 1024)
