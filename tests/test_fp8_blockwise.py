"""Block-wise FP8: quantise -> dequantise within e4m3's bound, the blockwise GEMM against dequantise-
then-matmul, and byte equality with DeepGEMM's reference semantics (amax clamped at 1e-4, x * 448 / amax,
scale amax / 448; power-of-two: 2^ceil(log2(amax / 448))), written out independently here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.fp8.blockwise import (
    FP8,
    blockwise_gemm,
    dequantize_activation,
    dequantize_weight,
    error_bound,
    quantize_activation,
    quantize_weight,
)

shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))
magnitudes = st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e4])


def _matrix(shape, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * magnitude
    # Outliers and exact zeros in some blocks: what real weights have.
    mask = torch.rand(shape, generator=g)
    return torch.where(mask < 0.01, x * 50, torch.where(mask > 0.98, torch.zeros_like(x), x))


@settings(max_examples=40, deadline=None)
@given(shapes, magnitudes, st.integers(0, 2**16), st.booleans())
def test_weight_round_trip_is_within_e4m3s_bound(shape, magnitude, seed, pow2):
    w = _matrix(shape, magnitude, seed)
    q, s = quantize_weight(w, pow2=pow2)
    assert q.dtype == FP8 and q.shape == w.shape
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)) and s.dtype == torch.float32
    back = dequantize_weight(q, s)
    per_element = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert ((w - back).abs() <= error_bound(w, per_element) * (1 + 1e-6)).all()
    if pow2:
        assert torch.equal(s, torch.pow(2.0, torch.log2(s).round()))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 400), magnitudes, st.integers(0, 2**16), st.booleans())
def test_activation_round_trip_is_within_e4m3s_bound(rows, k, magnitude, seed, pow2):
    x = _matrix((rows, k), magnitude, seed)
    q, s = quantize_activation(x, pow2=pow2)
    assert s.shape == (rows, math.ceil(k / 128))
    back = dequantize_activation(q, s)
    per_element = s.repeat_interleave(128, dim=-1)[..., :k]
    assert ((x - back).abs() <= error_bound(x, per_element) * (1 + 1e-6)).all()


def test_blockwise_gemm_equals_dequantise_then_matmul():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 384, generator=g)
    b = torch.randn(200, 384, generator=g) * 0.02
    qa, sa = quantize_activation(a)
    qb, sb = quantize_weight(b)
    ours = blockwise_gemm(qa, sa, qb, sb)
    plain = dequantize_activation(qa, sa) @ dequantize_weight(qb, sb).T
    assert ours.shape == (3, 7, 200)
    assert torch.allclose(ours, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))
    # And it is a close approximation of the unquantised product.
    exact = a @ b.T
    assert float((ours - exact).norm() / exact.norm()) < 0.05


def _deepgemm_per_block(x, pow2=False):
    """DeepGEMM's weight cast, as its reference documents it (pad to 128, amax over each block,
    floor 1e-4, scale amax / 448 or its power-of-two ceiling, values x * 448 / amax or x / scale)."""
    m, n = x.shape
    pm, pn = -(-m // 128) * 128, -(-n // 128) * 128
    padded = torch.zeros(pm, pn, dtype=x.dtype)
    padded[:m, :n] = x
    blocks = padded.view(pm // 128, 128, pn // 128, 128)
    amax = blocks.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    if pow2:
        sf = torch.pow(2.0, torch.ceil(torch.log2((amax / 448.0).abs())))
        values = blocks * (1.0 / sf)
    else:
        sf = amax / 448.0
        values = blocks * (448.0 / amax)
    return values.to(FP8).view(pm, pn)[:m, :n].contiguous(), sf.view(pm // 128, pn // 128)


def _deepgemm_per_token(x):
    m, n = x.shape
    tiles = x.view(m, -1, 128)
    amax = tiles.abs().float().amax(dim=2).clamp(1e-4)
    return (tiles * (448.0 / amax.unsqueeze(2))).to(FP8).view(m, n), amax / 448.0


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_cast_is_byte_equal_to_deepgemms_reference(pow2):
    w = _matrix((300, 200), 0.05, 3)
    q, s = quantize_weight(w, pow2=pow2)
    rq, rs = _deepgemm_per_block(w, pow2)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_activation_cast_is_byte_equal_to_deepgemms_reference():
    x = _matrix((9, 256), 3.0, 4)
    q, s = quantize_activation(x)
    rq, rs = _deepgemm_per_token(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


def test_gemm_accumulates_each_k_block_in_fp32_before_scaling():
    """Blocks with very different scales: summing raw fp8 products across K blocks first (no
    promotion) would be wrong by the ratio of the scales; per-block scaling is exact here."""
    a = torch.cat([torch.full((1, 128), 1e-3), torch.full((1, 128), 100.0)], dim=1)
    b = torch.ones(1, 256)
    qa, sa = quantize_activation(a)
    qb, sb = quantize_weight(b)
    assert float(blockwise_gemm(qa, sa, qb, sb)) == pytest.approx(128 * 1e-3 + 128 * 100.0, rel=1e-3)
