"""Intervals and paired comparisons on inputs whose answers are known."""

import numpy as np
import pytest
from scipy import stats as sps

from alignloop.eval.stats import mean_ci, paired, per_group_means


def test_mean_ci_matches_the_t_interval_by_hand():
    # mean 3, sd sqrt(2.5), se sqrt(0.5); t(0.975, 4) = 2.776445
    est = mean_ci([1, 2, 3, 4, 5])
    assert est.mean == pytest.approx(3.0)
    assert est.lo == pytest.approx(3.0 - 2.776445 * 0.5**0.5, abs=1e-5)
    assert est.hi == pytest.approx(3.0 + 2.776445 * 0.5**0.5, abs=1e-5)
    assert est.n == 5
    wider = mean_ci([1, 2, 3, 4, 5], level=0.99)
    assert wider.lo < est.lo and wider.hi > est.hi


def test_paired_difference_p_value_and_interval():
    a = np.zeros(5)
    b = np.array([1.0, 2, 3, 4, 5])
    d = paired(a, b)
    # t = 3 / sqrt(0.5) = 4.2426 with 4 degrees of freedom: two-sided p = 0.01324
    assert d.diff.mean == pytest.approx(3.0)
    assert d.t == pytest.approx(4.242641, abs=1e-5)
    assert d.p_value == pytest.approx(0.013236, abs=1e-5)
    # the same as scipy's paired t-test, and swapping the arms flips the sign only
    ref = sps.ttest_rel(b, a)
    assert d.p_value == pytest.approx(ref.pvalue) and d.t == pytest.approx(ref.statistic)
    back = paired(b, a)
    assert back.diff.mean == pytest.approx(-3.0) and back.p_value == pytest.approx(d.p_value)
    assert back.diff.lo == pytest.approx(-d.diff.hi)


def test_pairing_removes_the_items_own_spread():
    rng = np.random.default_rng(0)
    item = rng.normal(0, 5, 200)           # items differ a lot
    a, b = item + rng.normal(0, 0.1, 200), item + 0.1 + rng.normal(0, 0.1, 200)
    assert paired(a, b).p_value < 1e-6    # a small shift, seen clearly when paired
    assert sps.ttest_ind(a, b).pvalue > 0.5  # and lost in the spread when not


def test_degenerate_inputs():
    same = paired([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert same.p_value == 0.0 and same.diff.mean == pytest.approx(1.0)
    assert paired([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        mean_ci([])


def test_per_group_means():
    out = per_group_means(np.array([1.0, 3.0, 10.0, 5.0]), np.array([2, 2, 0, 1]))
    assert out.tolist() == [10.0, 5.0, 2.0]


def test_pair_accuracy_against_a_common_reference():
    import torch

    from alignloop.eval.pairs import accuracy

    reference = torch.tensor([[-10.0, -10.0], [-10.0, -10.0], [-10.0, -10.0], [-10.0, -10.0]])
    # pair 0: chosen up vs reference; 1: rejected up; 2: both up equally (a tie); 3: chosen down less
    policy = torch.tensor([[-8.0, -10.0], [-10.0, -9.0], [-9.0, -9.0], [-11.0, -13.0]])
    lengths = torch.tensor([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [1.0, 4.0]])
    acc = accuracy(policy, reference, lengths)
    assert acc.accuracy == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert acc.margin == pytest.approx((2 - 1 + 0 + 2) / 4)
    # own preference per token: -4 > -5, -5 < -4.5, tie, -11 < -3.25
    assert acc.logp_accuracy == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    # the reference against itself is a coin flip whatever its log-probs
    assert accuracy(reference, reference, lengths).accuracy == 0.5
    assert accuracy(policy, None, lengths).accuracy is None
