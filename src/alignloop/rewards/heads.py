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

User-activity features (when a model uses them beside the text) take their own linear path, fitted
first and to convergence (full batch, L-BFGS), then frozen; the text head, started at zero, learns
the rest. Two numbers next to ~400 text dimensions would otherwise be drowned in the MLP's noise,
and early stopping (which the text head needs within ~50 steps) would stop before the activity
path learned anything (measured: text+activity heads trailed activity-only heads on retention).

After training, binary and regression heads are *calibrated* on the held-out training users: a
scale and shift of the raw output (Platt scaling for logits, least squares for regressions), scale
kept >= 0. A head whose raw output is over-confident (overfit frozen features) then predicts
probabilities and values on the labels' scale, and one with no skill on new users falls back to
the mean instead of doing worse than it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from alignloop.rewards.config import BINARY


CALIBRATED = {*BINARY, "turns_after", "quality"}


class Heads(nn.Module):
    def __init__(self, dim: int, names: list[str], hidden: int = 128, dropout: float = 0.1, side_dim: int = 0):
        """`side_dim`: the last features (user activity) go through a linear path of their own."""
        super().__init__()
        self.names = list(names)
        self.side_dim = side_dim
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        main = dim - side_dim

        def head() -> nn.Module:
            if hidden == 0:
                return nn.Linear(main, 1)
            return nn.Sequential(nn.Dropout(dropout), nn.Linear(main, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, 1))

        self.heads = nn.ModuleDict({n: head() for n in names})
        self.side = nn.ModuleDict({n: nn.Linear(side_dim, 1) for n in names}) if side_dim else None
        if self.side is not None:
            # The text head learns what the activity path leaves: it starts at zero, so "activity alone"
            # is where training starts and what early stopping falls back to.
            for h in self.heads.values():
                last = h if isinstance(h, nn.Linear) else h[-1]
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        self.register_buffer("calibration", torch.tensor([[1.0, 0.0]] * len(self.names)))  # scale, shift
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

    def raw(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        """The head's output before calibration."""
        if self.side is None:
            return self.heads[name]((feats - self.mean) / self.std).squeeze(-1)
        main = (feats[:, :-self.side_dim] - self.mean[:-self.side_dim]) / self.std[:-self.side_dim]
        return self.heads[name](main).squeeze(-1) + self.side_output(feats[:, -self.side_dim:], name)

    def side_output(self, activity: torch.Tensor, name: str) -> torch.Tensor:
        """The activity path alone, on the activity columns only."""
        assert self.side is not None
        x = (activity - self.mean[-self.side_dim:]) / self.std[-self.side_dim:]
        return self.side[name](x).squeeze(-1)

    def forward(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        scale, shift = self.calibration[self.names.index(name)]
        return scale * self.raw(feats, name) + shift

    @torch.no_grad()
    def calibrate(self, name: str, raw: torch.Tensor, label: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
        """Fit this head's scale and shift on held-out rows (raw outputs); returns them."""
        w = (weight / weight.sum()).double()
        x, y = raw.double(), target(name, label).double()
        if name in BINARY:
            ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
            with torch.enable_grad():
                minimize([ab], lambda: (F.binary_cross_entropy_with_logits(ab[0] * x + ab[1], y, reduction="none")
                                        * w).sum(), max_iter=100)
            scale, shift = float(ab[0].detach()), float(ab[1].detach())
        else:
            mx, my = (w * x).sum(), (w * y).sum()
            var = (w * (x - mx) ** 2).sum()
            scale = float((w * (x - mx) * (y - my)).sum() / var) if var > 0 else 0.0
            shift = float(my - scale * mx)
        if not (math.isfinite(scale) and math.isfinite(shift)):
            return 1.0, 0.0
        if scale < 0:  # anti-correlated on new users: no skill; predict the held-out mean (log-odds)
            scale = 0.0
            p = float((w * y).sum())
            shift = math.log(max(p, 1e-6) / max(1 - p, 1e-6)) if name in BINARY else p
        self.calibration[self.names.index(name)] = torch.tensor([scale, shift])
        return scale, shift


def minimize(params: list[torch.Tensor], objective: Callable[[], torch.Tensor], max_iter: int) -> None:
    """Full-batch L-BFGS on a small convex fit (a few parameters, every row at once)."""
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    for q in params:
        q.grad = None


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
