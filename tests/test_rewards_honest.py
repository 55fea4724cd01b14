"""Reward-model reports that cannot flatter: base rates beside accuracy, no published figure on
skewed labels, a shortcut share only where it is a share, learned weights only when they win."""

from __future__ import annotations

import numpy as np
import pytest

from alignloop.rewards import metrics as M
from alignloop.rewards.combine import choose_weights, equal_weights
from alignloop.rewards.stage import _margin, summary_lines


def _skewed(n: int = 500, positive: float = 0.96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels `positive` of them 1, and a weak score that ranks them a little better than chance."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive).astype(float)
    p = np.clip(0.9 + 0.05 * (y - 0.5) + rng.normal(0, 0.08, n), 0, 1)
    return y, p


def _report(head: str, y: np.ndarray, p: np.ndarray, train_rate: float) -> dict:
    r = M.binary_report(y, p, train_rate)
    name, value, base = M.primary(head, r)
    r["primary"] = {"metric": name, "value": value, "baseline": base, "beats_baseline": value - base >= 0.03}
    return r


def test_majority_guess_scores_the_base_rate_not_skill():
    y, _ = _skewed()
    always = np.ones_like(y)
    r = M.binary_report(y, always, base_rate=float(y.mean()))
    assert r["accuracy"] == pytest.approx(y.mean()) == pytest.approx(r["baseline_accuracy"])
    assert r["accuracy"] > 0.9
    assert r["balanced_accuracy"] == 0.5 and r["baseline_balanced_accuracy"] == 0.5
    assert r["auc"] == 0.5 and r["positive_rate"] == pytest.approx(y.mean())


def test_balanced_accuracy_weighs_both_classes():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=float)
    p = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=float)  # every positive, half the negatives
    assert M.accuracy(y, p) == pytest.approx(0.9)
    assert M.balanced_accuracy(y, p) == pytest.approx(0.75)
    assert np.isnan(M.balanced_accuracy(np.ones(4), np.ones(4)))


def test_skewed_labels_get_no_industry_comparison_balanced_ones_do():
    y, p = _skewed()
    lines = summary_lines({"continue": _report("continue", y, p, 0.96)})
    row = next(line for line in lines if line.startswith("rm-eval continue"))
    assert "base rate 0.9" in row and "majority 0.9" in row and "balanced accuracy" in row
    head = next(line for line in lines if "headline: continue" in line)
    assert "industry accuracy" not in head and "no industry comparison" in head
    assert "AUC" in head and "balanced accuracy" in head and "majority" in head

    y2, p2 = _skewed(positive=0.5, seed=1)
    head = next(line for line in summary_lines({"continue": _report("continue", y2, p2, 0.5)})
                if "headline: continue" in line)
    assert "industry accuracy ~0.75 on balanced labels" in head


@pytest.mark.parametrize(("text_only", "full", "why"), [
    (0.541, 0.512, "undefined: text+activity gains"),     # gain 0.012: the 2.789 kind
    (0.420, 0.5015, "undefined: text+activity gains"),    # gain 0.0015: the -52.894 kind
    (0.45, 0.60, "undefined: text only is below the baseline"),
    (0.62, 0.58, "undefined: text only beats text+activity"),
])
def test_shortcut_share_is_undefined_where_it_is_no_share(text_only, full, why):
    naive = (text_only - 0.5) / (full - 0.5)
    kept, reason = M.shortcut_share(text_only, full, 0.5, _margin("auc"))
    assert kept is None and reason.startswith(why), (naive, reason)


def test_shortcut_share_in_the_report_line():
    y, p = _skewed(positive=0.5, seed=2)
    r = _report("continue", y, p, 0.5)
    base = r["primary"]["baseline"]
    r["shortcut"] = {"text only": base + 0.06, "text+activity": base + 0.08, "activity only": base + 0.05}
    kept, reason = M.shortcut_share(base + 0.06, base + 0.08, base, 0.03)
    assert kept == pytest.approx(0.75) and reason == ""
    line = [x for x in summary_lines({"continue": r}) if "shortcut" in x][0]
    assert line.endswith("share surviving without activity 0.750")

    r["shortcut"] = {"text only": base + 0.012, "text+activity": base + 0.0043, "activity only": base}
    line = [x for x in summary_lines({"continue": r}) if "shortcut" in x][0]
    assert "share surviving without activity undefined: text+activity gains +0.004" in line
    share = line.rsplit("share surviving without activity ", 1)[1]
    assert not share[0].isdigit() and not share.startswith("-")


def _components(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(n) for k in ("continue", "thumbs", "returned_1d", "turns_after")}


def test_learned_weights_that_lose_to_equal_ones_are_not_served(capsys):
    """A KPI the training users' components do not predict at all: the fit is noise, and on
    held-out users (where the KPI follows the plain sum) equal weights win."""
    rng = np.random.default_rng(0)
    z_t, z_e = _components(400, rng), _components(400, rng)
    kpi_t = (rng.random(400) < 0.5).astype(float)                  # independent of the components
    kpi_e = (sum(z_e.values()) + rng.normal(0, 1.0, 400) > 0).astype(float)
    choice = choose_weights(z_t, kpi_t, z_e, kpi_e)
    assert choice.auc_learned < choice.auc_equal
    assert choice.served == "equal" and choice.weights == equal_weights(sorted(z_t))
    warning = choice.warning("returned_7d")
    assert warning is not None and "\n" not in warning
    assert f"AUC {choice.auc_learned:.4f} vs {choice.auc_equal:.4f}" in warning and "keeping equal weights" in warning


def test_learned_weights_that_win_are_served():
    rng = np.random.default_rng(1)
    z_t, z_e = _components(2000, rng), _components(2000, rng)

    def kpi(z):  # one component matters, another hurts: equal weights cannot express that
        return (2.0 * z["continue"] - z["thumbs"] + rng.normal(0, 0.5, len(z["thumbs"])) > 0).astype(float)

    choice = choose_weights(z_t, kpi(z_t), z_e, kpi(z_e))
    assert choice.served == "learned" and choice.auc_learned > choice.auc_equal
    assert choice.weights == choice.learned and choice.warning("continue") is None
