import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.engine.sampling import sample, uniforms


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


@settings(max_examples=60, deadline=None)
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
