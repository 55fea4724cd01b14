import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignloop.kernels import native
from alignloop.engine.sampling import sample, uniforms
from native_paths import native_and_torch


probabilities_from = native_and_torch("softmax_blocks")


def draw(logits, temperature=1.0, top_p=1.0, top_k=0, n=20000, seed=0):
    """n samples from one logits row (as n rows with distinct counters)."""
    rows = logits.expand(n, -1).contiguous()
    return sample(rows, torch.full((n,), temperature), torch.full((n,), top_p),
                  torch.full((n,), top_k, dtype=torch.long),
                  np.full(n, seed, dtype=np.uint64), np.arange(n, dtype=np.uint64))


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference top-p by full sort: the renormalised distribution over the nucleus."""
    vals, idx = probs.sort(descending=True)
    keep = (vals.cumsum(0) - vals) < top_p
    out = torch.zeros_like(probs)
    out[idx[keep]] = vals[keep]
    return out / out.sum()


def test_uniforms_are_uniform_and_keyed():
    u = uniforms(np.zeros(100000, dtype=np.uint64), np.arange(100000, dtype=np.uint64)).numpy()
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    assert np.histogram(u, bins=10)[0].min() > 9500
    again = uniforms(np.zeros(5, dtype=np.uint64), np.arange(5, dtype=np.uint64)).numpy()
    other = uniforms(np.ones(5, dtype=np.uint64), np.arange(5, dtype=np.uint64)).numpy()
    assert np.array_equal(again, u[:5]) and not np.array_equal(other, u[:5])


@pytest.mark.parametrize("top_p,top_k,temperature", [(1.0, 0, 1.0), (0.8, 0, 1.0), (0.5, 0, 0.7),
                                                     (1.0, 3, 1.0), (0.7, 4, 1.3)])
def test_sampled_frequencies_match_the_truncated_distribution(top_p, top_k, temperature):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    tokens, logprobs = draw(logits, temperature, top_p, top_k)
    probs = torch.softmax(logits / temperature, -1)
    expected = probs.clone()
    if top_k:
        expected[probs.argsort(descending=True)[top_k:]] = 0
        expected /= expected.sum()
    expected = nucleus(expected, top_p)
    freq = torch.bincount(tokens, minlength=len(logits)).float() / len(tokens)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.5])
    tokens, _ = sample(logits, temperature, torch.ones(6), torch.zeros(6, dtype=torch.long),
                       np.arange(6, dtype=np.uint64), np.zeros(6, dtype=np.uint64))
    assert tokens[[0, 2, 4]].tolist() == logits[[0, 2, 4]].argmax(-1).tolist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    logits=st.lists(st.floats(-20, 20), min_size=2, max_size=64),
    top_p=st.floats(0.05, 1.0),
    top_k=st.integers(0, 10),
    seed=st.integers(0, 2**32),
)
def test_a_sample_is_always_inside_the_allowed_set(logits, top_p, top_k, seed):
    x = torch.tensor(logits)
    tokens, _ = draw(x, 1.0, top_p, top_k, n=32, seed=seed)
    probs = torch.softmax(x, -1)
    allowed = probs.clone()
    if top_k:
        allowed[probs.argsort(descending=True, stable=True)[top_k:]] = 0
        allowed /= allowed.sum()
    allowed = nucleus(allowed, top_p)
    # Never less likely than the least likely allowed token (ties at the boundary may swap).
    least = probs[allowed > 0].min()
    for t in tokens.tolist():
        assert probs[t] >= least * (1 - 1e-5)


def test_rows_sampled_without_top_k_read_the_kernels_block_mass(probabilities_from, monkeypatch):
    # The native path is taken exactly when every row samples without top-k, and its log-probs are
    # log softmax(logits / T) of the tokens drawn.
    calls = []
    kernel = native.softmax_blocks()
    monkeypatch.setattr(native, "softmax_blocks", lambda: kernel and (lambda *a: calls.append(1) or kernel(*a)))
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    t = torch.tensor([1.0, 0.7, 1.3, 1.0])
    tokens, logprobs = sample(logits, t, torch.full((4,), 0.9), torch.zeros(4, dtype=torch.long),
                              np.arange(4, dtype=np.uint64), np.zeros(4, dtype=np.uint64))
    assert len(calls) == (1 if probabilities_from == "native" else 0)
    want = torch.log_softmax(logits.float() / t[:, None], -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(logprobs, want, atol=1e-4)
    sample(logits, t, torch.ones(4), torch.tensor([0, 0, 5, 0]), np.arange(4, dtype=np.uint64),
           np.zeros(4, dtype=np.uint64))
    assert len(calls) == (1 if probabilities_from == "native" else 0)  # a top-k row: torch ops for all


def test_masked_logits_are_never_drawn(probabilities_from):
    # -inf logits (a masked token) reach the kernel, which assumes finite floats: it reports them,
    # and the batch is drawn by torch ops instead.
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    logits[:, ::2] = float("-inf")
    tokens, logprobs = sample(logits, torch.ones(3), torch.full((3,), 0.95), torch.zeros(3, dtype=torch.long),
                              np.arange(3, dtype=np.uint64), np.zeros(3, dtype=np.uint64))
    assert (tokens % 2 == 1).all() and torch.isfinite(logprobs).all()
    if probabilities_from == "native":
        _, _, finite = native.softmax_blocks()(logits, torch.ones(3), 8)
        assert not bool(finite)
