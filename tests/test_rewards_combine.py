"""Reward API validation, combination, the safety constraint (hard and Lagrangian), metrics, Tobit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.errors import AlignloopError
from alignloop.rewards import metrics as M
from alignloop.rewards.api import RewardBatch, validated
from alignloop.rewards.combine import Lagrangian, Normalizer, equal_weights, hard_constraint, learn_weights
from alignloop.rewards.config import CombineSection
from alignloop.rewards.heads import tobit_nll
from alignloop.rewards.serve import CombinedReward

CTX = [{"role": "user", "content": "hi"}]


class StubModel:
    """Stands in for a trained RewardModel: returns preset head outputs."""

    activity = False

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs
        self.names = list(outputs)

    def score(self, contexts, responses):
        return {k: np.asarray(v, dtype=np.float64)[: len(responses)] for k, v in self.outputs.items()}


# --- api --------------------------------------------------------------------------------------


def test_validated_names_the_failing_sample():
    def fn(contexts, responses):
        if any(r == "boom" for r in responses):
            raise ValueError("bad")
        return RewardBatch(np.zeros(len(responses)))

    with pytest.raises(AlignloopError, match="sample 2"):
        validated(fn)([CTX] * 3, ["a", "b", "boom"])
    assert len(validated(fn)([CTX] * 2, ["a", "b"])) == 2


def test_validated_catches_nan_and_wrong_count():
    with pytest.raises(AlignloopError, match="at sample 1"):
        validated(lambda c, r: RewardBatch(np.array([0.0, np.nan])))([CTX] * 2, ["a", "b"])
    with pytest.raises(AlignloopError, match="1 rewards for 2"):
        validated(lambda c, r: RewardBatch(np.array([0.0])))([CTX] * 2, ["a", "b"])
    with pytest.raises(AlignloopError, match="component 'x'"):
        validated(lambda c, r: RewardBatch(np.zeros(2), {"x": np.array([1.0, np.inf])}))([CTX] * 2, ["a", "b"])
    with pytest.raises(AlignloopError, match="2 contexts but 1"):
        validated(lambda c, r: RewardBatch(np.zeros(1)))([CTX] * 2, ["a"])


# --- safety as a hard constraint ----------------------------------------------------------------

probs = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 12), tau=st.floats(0.0, 1.0), penalty=st.floats(0.1, 50.0),
       lam=st.floats(0.0, 20.0))
def test_no_flagged_response_scores_above_minus_k(data, n, tau, penalty, lam):
    big = st.floats(-1e6, 1e6, allow_nan=False)
    outputs = {"continue": np.array(data.draw(st.lists(probs, min_size=n, max_size=n))),
               "preference": np.array(data.draw(st.lists(big, min_size=n, max_size=n))),
               "safety": np.array(data.draw(st.lists(probs, min_size=n, max_size=n)))}
    config = CombineSection(safety_tau=tau, hard_penalty=penalty, lambda_init=lam,
                            weights={"continue": data.draw(st.floats(-5, 5)), "preference": data.draw(st.floats(-5, 5))})
    fn = validated(CombinedReward(StubModel(outputs), Normalizer({"continue": 0.5, "preference": 0.0},
                                                                 {"continue": 0.1, "preference": 1.0}),
                                  config.weights, config))
    batch = fn([CTX] * n, ["r"] * n)
    flagged = (1.0 - outputs["safety"]) < tau
    assert np.array_equal(batch.unsafe, flagged)
    assert (batch.reward[flagged] <= -penalty).all()
    assert set(batch.components) >= {"raw/continue", "raw/preference", "raw/safety", "p_unsafe", "flagged"}


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=20), st.floats(0, 1), st.floats(0.01, 100))
def test_hard_constraint_function(rewards, tau, k):
    r = np.array(rewards)
    safety = np.linspace(0, 1, len(r))
    out, flagged = hard_constraint(r, safety, tau, k)
    assert (out[flagged] == -k).all() and (out[~flagged] == r[~flagged]).all()


# --- Lagrangian ----------------------------------------------------------------------------------


def test_lagrangian_rises_over_budget_and_falls_under():
    lag = Lagrangian(budget=0.05, lr=2.0)
    values = [lag.update(0.3) for _ in range(5)]
    assert all(b > a for a, b in zip([0.0, *values], values))
    falling = [lag.update(0.0) for _ in range(3)]
    assert all(b < a for a, b in zip([values[-1], *falling], falling))
    for _ in range(100):
        lag.update(0.0)
    assert lag.value == 0.0  # projected: never negative


def test_lagrangian_inside_the_reward_fn():
    config = CombineSection(unsafe_budget=0.1, dual_lr=1.0, weights={"continue": 1.0}, safety_tau=0.0)
    unsafe = StubModel({"continue": np.full(4, 0.5), "safety": np.full(4, 0.6)})
    fn = CombinedReward(unsafe, Normalizer({"continue": 0.5}, {"continue": 1.0}), config.weights, config)
    first = fn([CTX] * 4, ["r"] * 4)
    assert fn.lagrangian.value > 0 and first.reward.mean() == pytest.approx(0.0)
    second = fn([CTX] * 4, ["r"] * 4)
    assert second.reward.mean() < first.reward.mean()  # the price of unsafety is now paid
    fn.model = StubModel({"continue": np.full(4, 0.5), "safety": np.full(4, 0.0)})
    before = fn.lagrangian.value
    fn([CTX] * 4, ["r"] * 4)
    assert fn.lagrangian.value < before


# --- combination -------------------------------------------------------------------------------


def test_normalizer_and_sign():
    raw = {"continue": np.array([0.2, 0.4, 0.6]), "time_to_next": np.array([1.0, 2.0, 3.0])}
    norm = Normalizer.fit(raw)
    z = norm(raw)
    assert z["continue"].mean() == pytest.approx(0) and z["continue"].std() == pytest.approx(1)
    assert z["time_to_next"][0] > z["time_to_next"][2]  # a sooner reply scores higher


def test_learned_weights_beat_equal_weights_on_held_out_rows():
    rng = np.random.default_rng(0)
    n = 4000
    signal, noise1, noise2 = rng.normal(size=(3, n))
    kpi = (rng.random(n) < 1 / (1 + np.exp(-2 * signal))).astype(float)
    z = {"a": signal, "b": noise1, "c": noise2}
    tr, ev = slice(0, n // 2), slice(n // 2, n)
    w = learn_weights({k: v[tr] for k, v in z.items()}, kpi[tr])
    auc = lambda weights: M.auc(kpi[ev], sum(weights[k] * z[k][ev] for k in z))  # noqa: E731
    assert w["a"] > 0.8
    assert auc(w) > auc(equal_weights(list(z))) + 0.05


def test_unknown_weight_is_an_error():
    with pytest.raises(ValueError, match="unknown components"):
        CombineSection(weights={"engagement": 1.0})
    with pytest.raises(AlignloopError, match="no head"):
        CombinedReward(StubModel({"continue": np.zeros(1)}), Normalizer(), {"thumbs": 1.0}, CombineSection())


# --- metrics and the censored regression ---------------------------------------------------------


def test_metrics():
    y = np.array([0, 0, 1, 1.0])
    assert M.auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert M.ece(np.array([1.0, 0, 1, 0]), np.full(4, 0.5)) == pytest.approx(0.0)
    assert M.ece(np.array([1.0, 1, 1, 1]), np.full(4, 0.5)) == pytest.approx(0.5)
    t = np.array([1.0, 2.0, 3.0, 4.0])
    cens = np.array([False, False, False, True])
    assert M.concordance(t, cens, t) == 1.0
    assert M.concordance(t, cens, -t) == 0.0
    assert M.r2(t, t) == 1.0 and math.isclose(M.pearson(t, 2 * t), 1.0)


def test_tobit_recovers_the_mean_that_dropping_censored_rows_misses():
    gen = torch.Generator().manual_seed(0)
    y = 3.0 + 1.0 * torch.randn(2000, generator=gen)
    c = torch.tensor(3.5)
    censored = y > c
    mu = torch.zeros((), requires_grad=True)
    log_sigma = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        tobit_nll(mu.expand(2000), torch.where(censored, c, y), censored, log_sigma, c).mean().backward()
        opt.step()
    naive = y[~censored].mean()
    assert abs(mu.item() - 3.0) < 0.1 < abs(naive.item() - 3.0)
    assert abs(log_sigma.exp().item() - 1.0) < 0.1


def test_a_feature_constant_in_training_is_ignored_not_blown_up():
    from alignloop.rewards.heads import Heads

    heads = Heads(3, ["continue"], hidden=0, dropout=0.0)
    train = torch.tensor([[0.0, 1.0, 5.0], [1.0, 1.0, 6.0], [2.0, 1.0, 7.0]])  # column 1 never varies
    heads.set_standardizer(train)
    seen = torch.tensor([[1.0, 1.0, 6.0]])
    shifted = torch.tensor([[1.0, 0.3, 6.0]])  # only the constant feature differs
    assert torch.equal(heads(seen, "continue"), heads(shifted, "continue"))
    assert torch.isfinite(heads(shifted, "continue")).all()
