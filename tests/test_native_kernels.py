"""The hand-written kernels against torch maths. Decode attention: the same attention as fp32, the
cache written where it should be and nowhere else, bad input refused, the bf16 engine as close to
fp32 with it as without it. Packed attention: each text attends to itself only, as torch's SDPA per
text. (softmax_blocks: tests/test_sampling.py.) Skips where the kernels cannot build
(`native.why_not`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.kernels import native

pytestmark = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernel: {native.why_not()}")


def built(op: str):
    fn = getattr(native, op)()
    if fn is None:
        pytest.skip("the native kernels did not build here")
    return fn


@pytest.fixture(scope="module")
def kernel():
    return built("decode_attention")


def reference(q, k_cache, v_cache, positions, scale):
    """fp32 attention of row i over positions 0..positions[i] of slot i."""
    n, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    out = torch.empty(n, heads, dim)
    for i in range(n):
        keys = k_cache[i, :, : positions[i] + 1].float().repeat_interleave(group, 0)
        values = v_cache[i, :, : positions[i] + 1].float().repeat_interleave(group, 0)
        weights = (torch.einsum("hd,htd->ht", q[i].float(), keys) * scale).softmax(-1)
        out[i] = torch.einsum("ht,htd->hd", weights, values)
    return out.reshape(n, heads * dim)


@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 9, 3), (32, 4, 4), (48, 8, 2)])
def test_kernel_matches_fp32_attention_and_writes_only_the_new_position(kernel, dim, heads, kv_heads):
    torch.manual_seed(dim)
    n, slots, capacity = 5, 7, 40
    k_cache = torch.randn(slots, kv_heads, capacity, dim).bfloat16()
    v_cache = torch.randn(slots, kv_heads, capacity, dim).bfloat16()
    # Strided q, k and v, as the engine passes them: views of one fused projection.
    fused = torch.randn(n, heads + 2 * kv_heads, dim).bfloat16()
    q, k, v = fused.split((heads, kv_heads, kv_heads), dim=1)
    positions = torch.tensor([0, 3, 39, 17, 1])
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    for i, p in enumerate(positions.tolist()):
        expect_k[i, :, p], expect_v[i, :, p] = k[i], v[i]
    out = kernel(q, k, v, k_cache, v_cache, positions, dim**-0.5)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    want = reference(q, expect_k, expect_v, positions.tolist(), dim**-0.5)
    assert out.dtype == torch.bfloat16 and out.shape == (n, heads * dim)
    # Only the output's rounding to bf16 differs (fp32 inside): within one bf16 ulp of |x| <= ~4.
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)


def rotated(x, cos, sin):
    """The engine's rotation (`llama._rotate`) in fp32: x [n, heads, d], cos/sin [n, d]."""
    half = x.shape[-1] // 2
    x = x.float()
    return x * cos.float()[:, None] + torch.cat((x[..., half:], x[..., :half]), -1) * sin.float()[:, None]


@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 9, 3), (32, 4, 2)])
def test_kernel_rotates_q_and_k_at_each_rows_position(kernel, dim, heads, kv_heads):
    torch.manual_seed(dim + 1)
    n, slots, capacity, table = 4, 5, 24, 30
    k_cache = torch.randn(slots, kv_heads, capacity, dim).bfloat16()
    v_cache = torch.randn(slots, kv_heads, capacity, dim).bfloat16()
    fused = torch.randn(n, heads + 2 * kv_heads, dim).bfloat16()
    q, k, v = fused.split((heads, kv_heads, kv_heads), dim=1)
    angles = torch.randn(table, dim) * 3
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    positions = torch.tensor([0, 5, 23, 11])
    out = kernel(q, k, v, k_cache, v_cache, positions, dim**-0.5, cos, sin)
    rq, rk = rotated(q, cos[positions], sin[positions]), rotated(k, cos[positions], sin[positions])
    for i, p in enumerate(positions.tolist()):  # the new keys land rotated (rounded once to bf16)
        torch.testing.assert_close(k_cache[i, :, p].float(), rk[i].bfloat16().float(), atol=1e-6, rtol=8e-3)
        assert torch.equal(v_cache[i, :, p], v[i])
    want = reference(rq, k_cache, v_cache, positions.tolist(), dim**-0.5)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match="come together"):
        kernel(q, k, v, k_cache, v_cache, positions, dim**-0.5, cos, None)
    with pytest.raises(RuntimeError, match="past the rotary tables"):
        kernel(q, k, v, k_cache, v_cache, positions, dim**-0.5, cos[:20], sin[:20])


def test_add_rms_norm_adds_in_place_then_normalises():
    add_rms_norm = built("add_rms_norm")
    torch.manual_seed(3)
    h = (torch.randn(64, 576) * 4).bfloat16()
    delta = torch.randn(64, 576).bfloat16()
    weight = torch.randn(576).bfloat16()
    summed = h + delta  # torch's bf16 add: the residual stream as the torch path leaves it
    want = F.rms_norm(summed.float(), (576,), weight.float(), eps=1e-5)
    out = add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, summed)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=1e-2)
    before = h.clone()
    torch.testing.assert_close(add_rms_norm(h, None, weight, 1e-5).float(), want, atol=2e-2, rtol=1e-2)
    assert torch.equal(h, before)  # nothing to add: h is left alone
    with pytest.raises(RuntimeError, match="delta must have h's shape"):
        add_rms_norm(h, delta[:3], weight, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        add_rms_norm(h.float(), None, weight, 1e-5)


def test_silu_mul_of_the_fused_gate_up():
    silu_mul = built("silu_mul")
    torch.manual_seed(4)
    gate_up = (torch.randn(64, 2 * 1536) * 5).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up).float(), F.silu(gate) * up, atol=3e-2, rtol=1e-2)
    with pytest.raises(RuntimeError, match="even width"):
        silu_mul(gate_up[:, 1:].contiguous())


def test_kernel_refuses_bad_input(kernel):
    k_cache = torch.zeros(2, 1, 8, 16, dtype=torch.bfloat16)
    q = torch.zeros(2, 1, 16, dtype=torch.bfloat16)
    k = torch.zeros(2, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="position outside the cache"):
        kernel(q, k, k.clone(), k_cache, k_cache.clone(), torch.tensor([0, 8]), 0.25)
    with pytest.raises(RuntimeError, match="bf16"):
        kernel(q.float(), k, k.clone(), k_cache, k_cache.clone(), torch.tensor([0, 1]), 0.25)


def test_bf16_decode_with_the_kernel_is_as_close_to_fp32_as_without(smollm2):
    # Teacher-forced along the fp32 engine's greedy answer: every decode step's log-probs from the
    # bf16 engine with the kernel and without it, each against fp32's. Both differ from fp32 by bf16
    # rounding alone; a wrong position, mask or cache write would be far off.
    model, tokenizer = smollm2
    e32 = Engine(model, tokenizer, dtype="float32", show_progress=False)
    e16 = Engine(model, tokenizer, dtype="bfloat16", show_progress=False)
    errors: dict[str, list[float]] = {"kernel": [], "torch": []}
    agree: dict[str, list[bool]] = {"kernel": [], "torch": []}
    for text in ("What is the capital of France?", "Tell me a joke about cats."):
        ids = e32.encode_chat([{"role": "user", "content": text}])
        answer = e32.chat([[{"role": "user", "content": text}]], SamplingParams(temperature=0, max_tokens=16))[0]
        seq = ids + answer.token_ids
        logprobs = {}
        for name, engine, use in (("fp32", e32, False), ("kernel", e16, True), ("torch", e16, False)):
            engine.lm.use_native = use
            engine.lm.ensure_cache(1, len(seq))
            steps = [engine.lm.prefill([ids], 0)[0]]
            steps += [engine.lm.decode(torch.tensor([seq[t]]), torch.tensor([t]))[0] for t in range(len(ids), len(seq) - 1)]
            logprobs[name] = torch.log_softmax(torch.stack(steps).float(), -1)
        truth = logprobs["fp32"]
        for name in ("kernel", "torch"):
            errors[name].append(float((logprobs[name] - truth).abs().mean()))
            agree[name] += (logprobs[name].argmax(-1) == truth.argmax(-1)).tolist()
    assert e16.lm._native_ops() is None  # the switch is honoured
    kernel, torch_ops = sum(errors["kernel"]) / 2, sum(errors["torch"]) / 2
    assert kernel < 0.15 and kernel < 1.5 * torch_ops + 0.02, errors
    assert sum(agree["kernel"]) >= 0.85 * len(agree["kernel"]), agree


@pytest.fixture(scope="module")
def packed():
    return built("packed_attention")


@pytest.mark.parametrize("dtype,tiles,pairs", [(torch.float32, False, False), (torch.bfloat16, False, False),
                                               (torch.bfloat16, False, True), (torch.bfloat16, True, False)])
@pytest.mark.parametrize("heads,dim", [(12, 32), (2, 64), (3, 48), (2, 80)])
def test_packed_attention_matches_sdpa_per_text(packed, dtype, tiles, pairs, heads, dim):
    if tiles and not torch.ops.alignloop.packed_attention_has_tiles():
        pytest.skip("no AMX tiles on this CPU (or the kernel was built without them)")
    if pairs and not torch.ops.alignloop.packed_attention_has_pairs():
        pytest.skip("no AVX512-BF16 on this CPU")
    torch.manual_seed(heads * dim)
    # Unsorted; a one-token text; lengths around the 16- and 32-key blocks; over 64 keys (more
    # score blocks than the tile path holds at once) and an odd length (a value row without a pair).
    lengths = [1, 5, 5, 16, 17, 40, 3, 33, 97, 64]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    qkv = torch.randn(sum(lengths), 3 * heads * dim).to(dtype)
    out = packed(qkv, offsets, heads, dim**-0.5, tiles, pairs)
    want = []
    for i, n in enumerate(lengths):
        q, k, v = qkv[offsets[i]:offsets[i + 1]].float().view(n, 3, heads, dim).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        want.append(o.transpose(0, 1).reshape(n, heads * dim))
    assert out.dtype == dtype and out.shape == (sum(lengths), heads * dim)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.float(), torch.cat(want), **tol)


def test_packed_attention_refuses_bad_offsets(packed):
    qkv = torch.zeros(6, 3 * 2 * 16)
    with pytest.raises(RuntimeError, match="from 0 to the token count"):
        packed(qkv, torch.tensor([0, 2, 5]), 2, 0.5)
    with pytest.raises(RuntimeError, match="an empty text"):
        packed(qkv, torch.tensor([0, 3, 3, 6]), 2, 0.5)
    with pytest.raises(RuntimeError, match="3 x heads x dim"):
        packed(qkv, torch.tensor([0, 6]), 5, 0.5)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        packed(qkv, torch.tensor([0, 6]), 4, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mass_above_is_the_probability_of_the_likelier_tokens(dtype):
    kernel, blocks = built("mass_above"), built("softmax_blocks")
    torch.manual_seed(3)
    logits = (torch.randn(5, 4096) * 2).to(dtype)
    inv_t = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.3])
    logz, _, finite = blocks(logits, inv_t, 256)
    rows, token = torch.tensor([4, 0, 2, 0]), torch.tensor([7, 4095, 100, 0])
    probs = torch.softmax(logits.float() * inv_t[:, None], -1)
    want = torch.stack([probs[r][probs[r] > probs[r, t]].sum() for r, t in zip(rows.tolist(), token.tolist())])
    assert bool(finite)
    torch.testing.assert_close(kernel(logits, rows, token, inv_t, logz), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel(logits, torch.tensor([5]), torch.tensor([0]), inv_t, logz)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [384, 40, 1])
def test_layer_norm_matches_torch(dtype, width):
    ln = built("layer_norm")
    torch.manual_seed(width)
    x = (torch.randn(300, width) * 3 + 1).to(dtype)  # an offset mean: the variance must not cancel
    w, b = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
    out = ln(x, w, b, 1e-12)
    want = F.layer_norm(x.float(), (width,), w.float(), b.float(), 1e-12)
    assert out.dtype == dtype and out.shape == x.shape
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.float(), want, **tol)


def test_layer_norm_refuses_bad_input():
    ln = built("layer_norm")
    with pytest.raises(RuntimeError, match="contiguous CPU matrix"):
        ln(torch.zeros(4, 8).t(), torch.zeros(4), torch.zeros(4), 1e-5)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        ln(torch.zeros(4, 8), torch.zeros(8).bfloat16(), torch.zeros(8), 1e-5)
    with pytest.raises(RuntimeError, match="in x's dtype"):
        ln(torch.zeros(4, 8), torch.zeros(7), torch.zeros(7), 1e-5)
