"""Metrics for reward heads on held-out users, and the baselines they must beat.

binary: AUC, accuracy at 0.5, balanced accuracy, expected calibration error, each beside its
baseline: the held-out base rate and the majority class's accuracy (what always answering the
training majority scores), AUC 0.5, balanced accuracy 0.5. On labels that are 96% positive an
accuracy of 0.96 is the majority baseline, not skill: AUC and balanced accuracy are the numbers
that do not reward guessing the majority. regression: R^2 and Pearson; baseline: the training
mean (R^2 <= 0). preference: pair accuracy; baseline 0.5. time_to_next adds Harrell's concordance
over all rows, so the censored ones count too.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def auc(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p, sample_weight=w))


def accuracy(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    return float(((p >= threshold) == (y >= 0.5)).mean())


def balanced_accuracy(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of the true-positive and true-negative rates at the threshold; nan with one class."""
    pos = y >= 0.5
    if pos.all() or not pos.any():
        return float("nan")
    hit = (p >= threshold) == pos
    return float(0.5 * (hit[pos].mean() + hit[~pos].mean()))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |mean p - mean y| per equal-width bin, weighted by bin size."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(total)


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - pred) ** 2).sum() / ss) if ss > 0 else float("nan")


def pearson(y: np.ndarray, pred: np.ndarray) -> float:
    if len(y) < 2 or y.std() == 0 or pred.std() == 0:
        return float("nan")
    return float(np.corrcoef(y, pred)[0, 1])


def concordance(time: np.ndarray, censored: np.ndarray, risk_time: np.ndarray, max_rows: int = 3000,
                seed: int = 0) -> float:
    """Harrell's C: among comparable pairs (the earlier time observed), the share where the model also
    predicts the earlier time. Pairs are O(n^2): a seeded sample of `max_rows` keeps it cheap."""
    n = len(time)
    if n > max_rows:
        keep = np.random.default_rng(seed).choice(n, max_rows, replace=False)
        time, censored, risk_time = time[keep], censored[keep], risk_time[keep]
    t = np.where(censored, np.inf, time)
    ti, tj = t[:, None], t[None, :]
    comparable = (ti < tj) & ~censored[:, None]
    if not comparable.any():
        return float("nan")
    pi, pj = risk_time[:, None], risk_time[None, :]
    right = (pi < pj) + 0.5 * (pi == pj)
    return float(right[comparable].mean())


def binary_report(y: np.ndarray, p: np.ndarray, base_rate: float, bins: int = 10) -> dict[str, float]:
    """`base_rate`: the training labels' positive share (the majority class and the constant
    predictor's calibration come from training, as a served baseline's would)."""
    majority = float(base_rate >= 0.5)
    return {"auc": auc(y, p), "accuracy": accuracy(y, p), "balanced_accuracy": balanced_accuracy(y, p),
            "ece": ece(y, p, bins), "baseline_auc": 0.5, "baseline_accuracy": float((y == majority).mean()),
            "baseline_balanced_accuracy": 0.5, "baseline_ece": ece(y, np.full_like(p, base_rate), bins),
            "positive_rate": float(y.mean()), "train_positive_rate": float(base_rate), "n": len(y)}


BALANCED = (0.4, 0.6)
"""Positive shares between which accuracy may be quoted against a published figure: outside them a
majority-class guess already scores above 0.6, so an accuracy says more about the labels than the model."""


def balanced_labels(positive_rate: float | None) -> bool:
    return positive_rate is not None and BALANCED[0] <= positive_rate <= BALANCED[1]


def shortcut_share(text_only: float, full: float, baseline: float, margin: float) -> tuple[float | None, str]:
    """(share of the text+activity model's gain over the baseline that the text-only model keeps, "")
    where that share is defined, else (None, why not).

    Defined only when text+activity beats the baseline by at least `margin` (a smaller gain is noise,
    and dividing by it gives shares like 2.8 or -53) and the share lands in [0, 1].
    """
    vals = (text_only, full, baseline)
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in vals):
        return None, "undefined: a metric is missing"
    gain, full_gain = text_only - baseline, full - baseline
    if full_gain < margin:
        return None, (f"undefined: text+activity gains {full_gain:+.3f} over the baseline, under the "
                      f"{margin:.2f} margin, so there is no activity gain to share")
    if gain < 0:
        return None, f"undefined: text only is below the baseline ({gain:+.3f})"
    if gain > full_gain:
        return None, f"undefined: text only beats text+activity by {gain - full_gain:.3f} (activity adds nothing)"
    return gain / full_gain, ""


def regression_report(y: np.ndarray, pred: np.ndarray, train_mean: float) -> dict[str, float]:
    return {"r2": r2(y, pred), "pearson": pearson(y, pred), "baseline_r2": r2(y, np.full_like(y, train_mean)),
            "n": len(y)}


def primary(head: str, report: dict[str, float]) -> tuple[str, float, float]:
    """(metric name, value, baseline value) that decides whether a head beats its baseline."""
    if head == "preference":
        return "pair_accuracy", report["pair_accuracy"], 0.5
    if "auc" in report:
        return "auc", report["auc"], report["baseline_auc"]
    if head == "time_to_next":
        return "concordance", report["concordance"], 0.5
    return "r2", report["r2"], report["baseline_r2"]
