"""Heads: the separate user-activity path and calibration on held-out rows."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.rewards.heads import Heads, target


def test_overconfident_logits_are_scaled_down_and_centred():
    torch.manual_seed(0)
    heads = Heads(2, ["continue"], hidden=0)
    p = torch.rand(4000) * 0.6 + 0.2                   # true chance of the label
    label = (torch.rand(4000) < p).float()
    raw = 5.0 * torch.logit(p) + 2.0                    # right order, five times too sure, shifted
    scale, shift = heads.calibrate("continue", raw, label, torch.ones(4000))
    assert abs(scale - 0.2) < 0.04 and abs(shift + 0.4) < 0.15
    prob = torch.sigmoid(scale * raw + shift)
    assert abs(float(prob.mean() - label.mean())) < 0.01


def test_regression_head_with_no_skill_falls_back_to_the_mean():
    heads = Heads(2, ["turns_after"], hidden=0)
    turns = torch.arange(200.0) % 7
    raw = -target("turns_after", turns)                 # anti-correlated on the held-out users
    scale, shift = heads.calibrate("turns_after", raw, turns, torch.ones(200))
    assert scale == 0.0 and math.isclose(shift, float(torch.log1p(turns).mean()), rel_tol=1e-6)
    x = torch.randn(5, 2)
    assert torch.allclose(heads(x, "turns_after"), torch.full((5,), shift))


@settings(max_examples=30, deadline=None)
@given(st.floats(0.1, 10), st.floats(-3, 3), st.integers(0, 10_000))
def test_least_squares_recovers_a_linear_miscalibration(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(300, generator=g)                   # on the head's scale: log1p(turns)
    turns = torch.expm1(y.clamp(min=-0.9))
    raw = (target("turns_after", turns) - b) / a        # the head's raw output, off by scale a and shift b
    heads = Heads(2, ["turns_after"], hidden=0)
    scale, shift = heads.calibrate("turns_after", raw, turns, torch.ones(300))
    assert math.isclose(scale, a, rel_tol=1e-4) and math.isclose(shift, b, abs_tol=1e-3 * max(1, abs(a)))


def test_activity_features_take_their_own_linear_path():
    heads = Heads(5, ["returned_7d"], hidden=8, side_dim=2).eval()
    assert heads.heads["returned_7d"][1].in_features == 3 and heads.side["returned_7d"].in_features == 2
    x = torch.randn(4, 5)
    moved = x.clone()
    moved[:, -2:] += 1.0
    # the activity path is linear: moving the activity features shifts every output by the same amount
    with torch.no_grad():
        d = heads(moved, "returned_7d") - heads(x, "returned_7d")
    assert torch.allclose(d, d[0].expand(4), atol=1e-5) and float(d.abs().max()) > 0


class _NoBackbone:
    """Features come precomputed (`cached`); the model only needs the width and a train switch."""

    dim = 128
    trainable = False

    def train(self, mode: bool = True) -> None:
        pass


def test_text_plus_activity_is_not_worse_than_activity_alone():
    """Users' activity predicts the label, the 128 text features are noise: the served text+activity
    head must keep the activity model's skill (it used to drown it in the text MLP's noise)."""
    import numpy as np

    from alignloop.rewards.config import HeadTrainSection
    from alignloop.rewards.data import ACTIVITY_DIM, HeadData
    from alignloop.rewards.metrics import auc
    from alignloop.rewards.model import Features, RewardModel

    rng = np.random.default_rng(0)

    def data(n_users: int, offset: int) -> tuple[HeadData, Features, dict[str, np.ndarray]]:
        users = np.array([f"u{offset + i}" for i in range(n_users)])
        act = {u: rng.normal(size=ACTIVITY_DIM).astype(np.float32) for u in users}
        uid = np.repeat(users, 10)
        p = 1 / (1 + np.exp(-2.0 * np.stack([act[u] for u in uid])[:, 0]))
        label = (rng.random(uid.size) < p).astype(np.float64)
        d = HeadData("returned_7d", "train", uid, uid, uid, [[]] * uid.size, [""] * uid.size, label,
                     np.zeros(uid.size, bool), np.ones(uid.size))
        return d, Features(torch.from_numpy(rng.normal(size=(uid.size, 128)).astype(np.float32))), act

    train, train_x, train_act = data(300, 0)
    test, test_x, test_act = data(100, 1000)
    cfg = HeadTrainSection(steps=200, eval_every=25, hidden=128, lr=5e-4, dropout=0.2, weight_decay=0.05)  # rm.toml's
    scores = {}
    for label, use_text in (("text+activity", True), ("activity only", False)):
        m = RewardModel(_NoBackbone(), ["returned_7d"], cfg, activity=True, use_text=use_text)
        m.fit({"returned_7d": train}, train_act, cached={"returned_7d": train_x})
        from alignloop.rewards.data import activity_matrix

        pred = m.predict(test_x.x, activity_matrix(test_act, test.user_id))["returned_7d"]
        scores[label] = auc(test.label, pred)
    assert scores["activity only"] > 0.7
    assert scores["text+activity"] >= scores["activity only"] - 0.02
