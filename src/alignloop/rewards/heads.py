"""Small heads on a shared feature vector, and each head's loss.

    binary       thumbs, continue, returned_1d, returned_7d, safety: a logit; weighted cross-entropy
    preference   a scalar reward; Bradley-Terry: -log sigmoid(r(chosen) - r(rejected))
    turns_after  regression on log1p(turns); squared error
    quality      regression on a rubric label in [0, 1]; squared error
    time_to_next regression on log(seconds) with right censoring (Tobit): a reply seen at t adds the
                 normal log-density of log t around the head's mu (one learned sigma); a user who never
                 replied adds log P(log T > log c) = log Phi((mu - log c) / sigma), c = the censoring
                 time. A no-reply says "later than c", not "never" and not "0": dropping those rows
                 would teach the head that everyone replies, and imputing c would shrink the spread.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from alignloop.rewards.config import BINARY


class Heads(nn.Module):
    def __init__(self, dim: int, names: list[str], hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.names = list(names)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

        def head() -> nn.Module:
            if hidden == 0:
                return nn.Linear(dim, 1)
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

        self.heads = nn.ModuleDict({n: head() for n in names})
        self.log_sigma = nn.Parameter(torch.zeros(()))  # time_to_next's spread on the log-seconds scale
        self.register_buffer("log_censor", torch.tensor(math.log(3600.0)))

    def set_standardizer(self, feats: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(feats.mean(0))
            # A feature that never varied in training (e.g. the context length when every example
            # has one user message) says nothing; scaled by a tiny std, any later deviation would
            # blow the head's input up by thousands of sigmas. Infinite spread: it is ignored.
            std = feats.std(0)
            self.std.copy_(torch.where(std > 1e-4, std, torch.full_like(std, float("inf"))))

    def forward(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        return self.heads[name]((feats - self.mean) / self.std).squeeze(-1)


def target(name: str, label: torch.Tensor) -> torch.Tensor:
    """The label on the scale the head predicts."""
    if name == "turns_after":
        return torch.log1p(label)
    if name == "time_to_next":
        return torch.log(label.clamp(min=1e-3))
    return label


def loss(heads: Heads, name: str, out: torch.Tensor, label: torch.Tensor, censored: torch.Tensor,
         weight: torch.Tensor, out_rejected: torch.Tensor | None = None) -> torch.Tensor:
    w = weight / weight.sum().clamp(min=1e-8)
    if name == "preference":
        assert out_rejected is not None
        per = -F.logsigmoid(out - out_rejected)
    elif name in BINARY:
        per = F.binary_cross_entropy_with_logits(out, label, reduction="none")
    elif name == "time_to_next":
        per = tobit_nll(out, target(name, torch.nan_to_num(label, nan=1.0)), censored, heads.log_sigma,
                        heads.log_censor)
    else:
        per = (out - target(name, label)) ** 2
    return (per * w).sum()


def tobit_nll(mu: torch.Tensor, y: torch.Tensor, censored: torch.Tensor, log_sigma: torch.Tensor,
              log_c: torch.Tensor) -> torch.Tensor:
    """Per-row negative log-likelihood of a normal on log time, right-censored at log_c."""
    sigma = log_sigma.exp()
    observed = 0.5 * ((y - mu) / sigma) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)
    survived = -torch.special.log_ndtr((mu - log_c) / sigma)
    return torch.where(censored, survived, observed)


def natural(name: str, out: torch.Tensor) -> torch.Tensor:
    """A head's output in the units a reward component uses: probabilities for binary heads,
    log1p(turns), log-seconds (mu), the Bradley-Terry score, the quality estimate."""
    return torch.sigmoid(out) if name in BINARY else out
