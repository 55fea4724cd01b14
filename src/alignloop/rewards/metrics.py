"""Metrics for reward heads on held-out users, and the baselines they must beat.

binary: AUC, accuracy at 0.5, expected calibration error; baseline: the training base rate
(accuracy of the majority class, AUC 0.5). regression: R^2 and Pearson; baseline: the training
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
    majority = float(base_rate >= 0.5)
    return {"auc": auc(y, p), "accuracy": accuracy(y, p), "ece": ece(y, p, bins),
            "baseline_auc": 0.5, "baseline_accuracy": float((y == majority).mean()),
            "baseline_ece": ece(y, np.full_like(p, base_rate), bins), "positive_rate": float(y.mean()), "n": len(y)}


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
