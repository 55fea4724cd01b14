"""One reward from many heads: normalise each component, weight them, and keep safety out of the trade.

    z_k    = sign_k * (x_k - mean_k) / std_k          stats from the heads' outputs on training rows;
                                                     sign -1 for time_to_next (a sooner reply is better)
    r      = sum_k w_k z_k                           weights from the recipe, equal, or learned to
                                                     predict a KPI (e.g. 7-day return) from the logs
    r      = r - lambda * p_unsafe                   Lagrangian: lambda rises by dual ascent while the
                                                     batch's mean p_unsafe exceeds the budget
    r      = -K   where safety score < tau           hard constraint: nothing engagement adds can buy
                                                     back an answer the safety head flags
    r      = max(r, -K + margin)  elsewhere          the floor: no unflagged answer, however low its
                                                     engagement or its Lagrangian price, scores at or
                                                     below a flagged one

The safety score is 1 - p(report) from the safety head; it never enters the weighted sum.
With K = 10 and margin 1 (the defaults), every flagged reply gets -10 and every unflagged one at
least -9, for any inputs and any lambda: crossing into unsafe always lowers the reward, so GRPO's
advantage never favours it. Without the floor an unflagged reply could sink below -K (-12 from low
engagement alone; -12.9 just under tau with lambda at its maximum of 100) and a flagged reply would
win. Unflagged replies below the floor tie there; the ordering above it is unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression

from alignloop.errors import AlignloopError
from alignloop.rewards.metrics import auc

SIGN: dict[str, float] = {"time_to_next": -1.0}


@dataclass
class Normalizer:
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, raw: dict[str, np.ndarray]) -> Normalizer:
        return cls({k: float(np.mean(v)) for k, v in raw.items()},
                   {k: float(max(np.std(v), 1e-6)) for k, v in raw.items()})

    def __call__(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [k for k in raw if k not in self.mean]
        if missing:
            raise AlignloopError(f"no normalisation stats for component(s) {missing}")
        return {k: SIGN.get(k, 1.0) * (np.asarray(v, dtype=np.float64) - self.mean[k]) / self.std[k]
                for k, v in raw.items()}

    def to_dict(self) -> dict:
        return asdict(self)


def weighted_sum(z: dict[str, np.ndarray], weights: dict[str, float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(sum_k w_k z_k, {k: w_k z_k}); a weight for a component that is not there is an error."""
    missing = [k for k in weights if k not in z]
    if missing:
        raise AlignloopError(f"combine.weights names component(s) {missing} that the reward model has no head for "
                             f"(heads: {', '.join(z)})")
    n = len(next(iter(z.values()))) if z else 0
    contributions = {k: w * z[k] for k, w in weights.items() if w != 0}
    total = np.sum(list(contributions.values()), axis=0) if contributions else np.zeros(n)
    return total, contributions


def hard_constraint(reward: np.ndarray, safety_score: np.ndarray, tau: float, penalty: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(reward with every flagged sample set to -penalty, flagged). Flagged: safety score below tau."""
    flagged = np.asarray(safety_score) < tau
    return np.where(flagged, -float(penalty), reward), flagged


def safety_floor(reward: np.ndarray, safety_score: np.ndarray, tau: float, penalty: float, margin: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(reward with flagged samples at -penalty and unflagged ones lifted to at least -penalty + margin,
    flagged). Every flagged reward is then below every unflagged one by at least `margin` (> 0)."""
    constrained, flagged = hard_constraint(reward, safety_score, tau, penalty)
    return np.where(flagged, constrained, np.maximum(constrained, -float(penalty) + float(margin))), flagged


@dataclass
class Lagrangian:
    """The multiplier on the unsafe rate, by projected dual ascent: lambda <- clip(lambda + lr (rate - budget))."""

    budget: float
    lr: float = 1.0
    value: float = 0.0
    max_value: float = 100.0

    def update(self, unsafe_rate: float) -> float:
        self.value = float(np.clip(self.value + self.lr * (unsafe_rate - self.budget), 0.0, self.max_value))
        return self.value


def equal_weights(components: list[str]) -> dict[str, float]:
    return {k: 1.0 / len(components) for k in components}


def learn_weights(z: dict[str, np.ndarray], kpi: np.ndarray, sample_weight: np.ndarray | None = None,
                  c: float = 1.0) -> dict[str, float]:
    """Weights that best predict a binary KPI from normalised components: an L2 logistic regression
    (the intercept only shifts the reward, so it is dropped), scaled so |w| sums to 1."""
    names = sorted(z)
    if len(np.unique(kpi)) < 2:
        raise AlignloopError("the KPI has one value on the training users; cannot learn weights from it")
    x = np.stack([z[k] for k in names], axis=1)
    fit = LogisticRegression(C=c, max_iter=2000).fit(x, kpi.astype(int), sample_weight=sample_weight)
    coef = fit.coef_[0]
    coef = coef / max(np.abs(coef).sum(), 1e-12)
    return {k: float(w) for k, w in zip(names, coef, strict=True)}


@dataclass
class WeightChoice:
    """Learned and equal weights scored on held-out users, and the ones to serve."""

    learned: dict[str, float]
    equal: dict[str, float]
    auc_learned: float
    auc_equal: float
    served: str  # "learned" or "equal"

    @property
    def weights(self) -> dict[str, float]:
        return self.learned if self.served == "learned" else self.equal

    def warning(self, kpi: str) -> str | None:
        if self.served == "learned":
            return None
        return (f"reward fit-weights: WARNING learned weights do not beat equal weights at predicting {kpi} on "
                f"held-out users (AUC {self.auc_learned:.4f} vs {self.auc_equal:.4f}); keeping equal weights")


def score_weights(z: dict[str, np.ndarray], weights: dict[str, float], kpi: np.ndarray) -> float:
    """Held-out AUC of the weighted sum of normalised components against a binary KPI."""
    total = sum((w * z[k] for k, w in weights.items()), np.zeros(len(kpi)))
    return auc(kpi, total)


def choose_weights(z_train: dict[str, np.ndarray], kpi_train: np.ndarray, z_eval: dict[str, np.ndarray],
                   kpi_eval: np.ndarray, sample_weight: np.ndarray | None = None, c: float = 1.0) -> WeightChoice:
    """Learn weights on training users, and keep them only if they beat equal weights on held-out ones.

    A fit that does not generalise (a KPI the components barely predict, few users) can land on
    weights worse than not fitting at all; then equal weights are served. A tie, or a held-out
    AUC that cannot be computed, also keeps equal weights: the fit must earn its place.
    """
    learned = learn_weights(z_train, kpi_train, sample_weight, c)
    equal = equal_weights(sorted(z_train))
    a_learned, a_equal = score_weights(z_eval, learned, kpi_eval), score_weights(z_eval, equal, kpi_eval)
    wins = bool(np.isfinite(a_learned) and (not np.isfinite(a_equal) or a_learned > a_equal))
    return WeightChoice(learned, equal, a_learned, a_equal, "learned" if wins else "equal")
