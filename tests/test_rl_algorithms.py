"""RL algorithms on small hand-computed cases: advantages, aggregation, clipping, KL, GAE, IS."""

import math

import pytest
import torch

from alignloop.rl import advantages as A
from alignloop.rl.losses import (
    Norm,
    aggregate,
    clipped_surrogate,
    kl,
    truncated_is,
    value_loss,
)


def test_grpo_normalises_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = A.grpo(r, group=4)
    # group 1: mean 0.25, unbiased std 0.5 -> (1 - .25)/.5 = 1.5, (0 - .25)/.5 = -0.5
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))  # identical rewards: no signal
    # Dr.GRPO: centred only
    assert torch.allclose(A.grpo(r, 4, scale=False)[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    with pytest.raises(ValueError, match="groups of 3"):
        A.grpo(r, group=3)


def test_rloo_leaves_one_out():
    adv = A.rloo(torch.tensor([3.0, 1.0, 2.0]), group=3)
    assert torch.allclose(adv, torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0]))


def test_reinforce_pp_normalises_over_the_batch():
    r = torch.tensor([1.0, 3.0, 5.0, 7.0])
    adv = A.reinforce_pp(r)
    assert torch.allclose(adv, (r - 4) / r.std(), atol=1e-5)
    # baseline variant: group means removed first -> [-1, 1, -1, 1] / std
    base = A.reinforce_pp(r, group=2)
    assert torch.allclose(base, torch.tensor([-1.0, 1, -1, 1]) / torch.tensor([-1.0, 1, -1, 1]).std(), atol=1e-5)


def test_gae_by_hand():
    # one row, 3 tokens, the middle one not the policy's (a user token): it is skipped over
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.2]])
    mask = torch.tensor([[True, False, True]])
    adv, ret = A.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.2                          # last: no bootstrap
    a2 = d2
    d0 = 0.0 + 0.9 * 0.2 - 0.5              # bootstraps from the next *policy* token's value
    a0 = d0 + 0.9 * 0.8 * a2
    assert torch.allclose(adv, torch.tensor([[a0, 0.0, a2]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 0.2]]), atol=1e-6)


def test_aggregations_weigh_lengths_differently():
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    norm = Norm(sequences=2, tokens=5, max_tokens=8)
    assert math.isclose(float(aggregate(values, mask, "seq-mean-token-mean", norm)), (1.0 + 4.0) / 2)
    assert math.isclose(float(aggregate(values, mask, "token-mean", norm)), 8.0 / 5, rel_tol=1e-6)
    assert math.isclose(float(aggregate(values, mask, "seq-mean-token-sum-norm", norm)), 8.0 / 16, rel_tol=1e-6)
    # Micro batches add up to the whole: split the rows, same total.
    whole = aggregate(values, mask, "token-mean", norm)
    parts = aggregate(values[:1], mask[:1], "token-mean", norm) + aggregate(values[1:], mask[1:], "token-mean", norm)
    assert torch.allclose(whole, parts)


def test_clipped_surrogate_and_clip_higher():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = clipped_surrogate(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    # positive advantage: min(r, clip(r)) -> 1.2, 0.5, 1.1 (loss is the negative)
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.1]]), atol=1e-6)
    assert math.isclose(float(stats["clip_frac"]), 1 / 3, rel_tol=1e-6)
    loss_hi, _ = clipped_surrogate(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    assert math.isclose(float(loss_hi[0, 0]), -1.28, rel_tol=1e-6)  # clip-higher: more room upward
    neg, _ = clipped_surrogate(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    # negative advantage: max(-A r, -A clip(r)) -> 1.5, 0.8, 1.1
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 1.1]]), atol=1e-6)
    # gradient: at ratio 1 it is -A * d logp
    lp = torch.zeros(1, 2, requires_grad=True)
    l, _ = clipped_surrogate(lp, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool))
    l.sum().backward()
    assert torch.allclose(lp.grad, torch.full((1, 2), -2.0))


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert math.isclose(float(kl(logp, ref, "k1")), 1.0)
    assert math.isclose(float(kl(logp, ref, "k2")), 0.5)
    assert math.isclose(float(kl(logp, ref, "k3")), math.exp(-1) + 1 - 1, rel_tol=1e-6)
    assert float(kl(ref, logp, "k3")) >= 0 and float(kl(logp, logp, "k3")) == 0
    assert float(kl(logp, ref, "none")) == 0


def test_value_loss_clips_around_the_old_value():
    v, old, ret = torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.0])
    # unclipped (2-0)^2 = 4, clipped value 0.2 -> 0.04; max -> 4, times 0.5
    assert math.isclose(float(value_loss(v, old, ret, 0.2)), 2.0)
    ret = torch.tensor([3.0])  # clipped value 0.2 is farther: (0.2-3)^2 = 7.84
    assert math.isclose(float(value_loss(v, old, ret, 0.2)), 0.5 * 7.84, rel_tol=1e-6)


def test_truncated_importance_weights_and_mismatch():
    old = torch.log(torch.tensor([[0.5, 0.9]]))
    rollout = torch.log(torch.tensor([[0.1, 0.9]]))
    w, stats = truncated_is(old, rollout, torch.ones(1, 2, dtype=torch.bool), cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 1.0]]))  # 5x, truncated at 2
    assert math.isclose(float(stats["is_truncated"]), 0.5)
    assert math.isclose(float(stats["mismatch_abs"]), math.log(5) / 2, rel_tol=1e-5)
