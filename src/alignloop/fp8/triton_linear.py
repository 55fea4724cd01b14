"""A fused FP8 linear for GPUs (Triton): y = x W^T with W in e4m3 128 x 128 blocks, x quantised to
e4m3 in 1 x 128 tiles on the fly, each K block's fp8 product promoted to fp32 and scaled before it
is added (the semantics of `blockwise.blockwise_gemm`, DeepSeek-V3's training GEMM).

Two kernels: one quantises the activations (a row's 128-wide tile per program), one multiplies,
applying both scales per K block inside the accumulation loop, so no dequantised weight ever
exists in memory; unfused (quantise, dequantise, matmul as separate ops) costs ~10x a bf16 linear.

Optional: Triton and a CUDA GPU with FP8 tensor cores (compute capability 8.9+). `available()` says
whether this machine has them; everything else in alignloop runs without this file.
`scripts/device/fp8_linear_bench.py` times it against `nn.Linear` in bf16 when a GPU is lent.
"""

from __future__ import annotations

import importlib.util

import torch

BLOCK = 128


def available() -> bool:
    return (importlib.util.find_spec("triton") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 9))


def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def act_quant(x_ptr, q_ptr, s_ptr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)  # one (row, K tile)
        offs = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x)), 1e-4)
        tl.store(q_ptr + offs, (x * (448.0 / amax)).to(q_ptr.dtype.element_ty))
        tl.store(s_ptr + pid, amax / 448.0)

    @triton.jit
    def gemm(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        kb_count = K // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb_count):
            a = tl.load(a_ptr + rm[:, None] * K + (kb * BLOCK_K + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            b = tl.load(b_ptr + rn[None, :] * K + (kb * BLOCK_K + rk)[:, None], mask=rn[None, :] < N, other=0.0)
            a_s = tl.load(as_ptr + rm * kb_count + kb, mask=rm < M, other=0.0)
            b_s = tl.load(bs_ptr + (rn // BLOCK_K) * kb_count + kb, mask=rn < N, other=0.0)
            # One K block's fp8 product in fp32, scaled, then added: the promotion per 128.
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return act_quant, gemm


_COMPILED = None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16, K a multiple of 128) times fp8 weight [N, K] with scale_inv [N/128, K/128]."""
    global _COMPILED
    if not available():
        raise RuntimeError("the fused FP8 linear needs Triton and a CUDA GPU with FP8 (compute capability 8.9+)")
    if _COMPILED is None:
        _COMPILED = _kernels()
    act_quant, gemm = _COMPILED
    lead, K = x.shape[:-1], x.shape[-1]
    if K % BLOCK:
        raise ValueError(f"K = {K} is not a multiple of {BLOCK}")
    x2 = x.reshape(-1, K).contiguous()
    M, N = x2.shape[0], weight.shape[0]
    q = torch.empty_like(x2, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, K // BLOCK, dtype=torch.float32, device=x.device)
    act_quant[(M * K // BLOCK,)](x2, q, s, BLOCK_K=BLOCK)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (-(-M // 64), -(-N // 128))
    gemm[grid](q, weight, out, s, scale_inv.float().contiguous(), M, N, K, BLOCK_M=64, BLOCK_N=128, BLOCK_K=BLOCK)
    return out.reshape(*lead, N)
