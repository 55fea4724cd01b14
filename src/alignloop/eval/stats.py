"""Confidence intervals and paired comparisons for per-prompt (or per-user) scores.

Student-t intervals on means and a paired t-test on differences: every model answers the same
prompts, so comparing them prompt by prompt removes the prompts' own spread (a paired design needs
far fewer prompts than two independent samples to see the same difference). scipy gives the t
distribution; the arithmetic around it is a few lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float      # confidence interval
    hi: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """mean(b - a) over paired observations, its interval, and the two-sided paired t-test p-value."""

    diff: Estimate
    t: float
    p_value: float

    def as_dict(self) -> dict[str, float]:
        return {**{f"diff_{k}": v for k, v in self.diff.as_dict().items()}, "t": self.t, "p_value": self.p_value}


def mean_ci(x: Sequence[float] | np.ndarray, level: float = 0.95) -> Estimate:
    """Mean with a Student-t interval (n - 1 degrees of freedom); a single value gets an infinite one."""
    x = np.asarray(x, dtype=float)
    n = x.size
    if n == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if n == 1:
        return Estimate(mean, -np.inf, np.inf, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95) -> PairedDifference:
    """How much b beats a on the same items: mean difference, interval, paired t-test p-value."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same shape, got {a.shape} and {b.shape}")
    d = b - a
    est = mean_ci(d, level)
    if d.size < 2:
        return PairedDifference(est, float("nan"), float("nan"))
    sd = d.std(ddof=1)
    if sd == 0:
        # Every item moved by the same amount: certain, unless that amount is zero.
        return PairedDifference(est, float("inf") if est.mean else 0.0, 0.0 if est.mean else 1.0)
    t = float(est.mean / (sd / np.sqrt(d.size)))
    return PairedDifference(est, t, float(2 * stats.t.sf(abs(t), d.size - 1)))


def per_group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of `values` within each group (sorted group order): prompts of one user are not independent,
    so intervals are computed over users."""
    keys, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=keys.size)
    return sums / np.bincount(inverse, minlength=keys.size)
