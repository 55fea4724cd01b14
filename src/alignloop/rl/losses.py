"""Token-level losses and the statistics logged with them.

Everything is [B, T] with a bool `mask` of the tokens that carry loss (the policy's own tokens).
A micro batch's loss is its share of the whole step's mean, so gradient accumulation over micro
batches equals one big batch: `Norm` carries the step's totals (sequences, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["k1", "k2", "k3", "none"]


@dataclass(frozen=True)
class Norm:
    """The optimizer step's totals that every micro batch divides by."""

    sequences: int
    tokens: int
    max_tokens: int  # Dr.GRPO's constant: the generation budget, the same for every sequence


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation, norm: Norm) -> torch.Tensor:
    """Reduce per-token values to this micro batch's share of the step loss.

    - seq-mean-token-mean (GRPO): each sequence's token mean, averaged over sequences; a long
      answer's tokens each count less than a short one's.
    - token-mean (DAPO): every token of the step counts alike, so long answers are not diluted.
    - seq-mean-token-sum-norm (Dr.GRPO): token sums divided by a constant (sequences x budget):
      no length bias at all.
    """
    m = mask.float()
    if mode == "token-mean":
        return (values * m).sum() / max(norm.tokens, 1)
    if mode == "seq-mean-token-mean":
        per_seq = (values * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return per_seq.sum() / max(norm.sequences, 1)
    if mode == "seq-mean-token-sum-norm":
        return (values * m).sum() / max(norm.sequences * norm.max_tokens, 1)
    raise ValueError(f"unknown aggregation {mode!r}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float = 0.2,
                      is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss per token (lower is better), with DAPO's separate upper clip.

    `advantages` is [B] (one per sequence) or [B, T]. clip_high > clip_low ("clip-higher") lets
    unlikely tokens that did well grow faster, which keeps entropy from collapsing.
    `is_weights` (truncated importance weights, rollout policy -> trainer's old policy) multiply
    the loss per token and get no gradient.
    Returns (per-token loss [B, T], {"clip_frac", "ratio_mean"} over the mask).
    """
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        loss = loss * is_weights.detach()
    m = mask.float()
    n = m.sum().clamp(min=1)
    stats = {"clip_frac": ((clipped > unclipped).float() * m).sum().detach() / n,
             "ratio_mean": (ratio.detach() * m).sum() / n}
    return loss, stats


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3).

    k1 = log p - log q is unbiased but can go negative; k3 = q/p - log(q/p) - 1 is unbiased and
    never negative (GRPO's choice); k2 = (log p - log q)^2 / 2 has the right gradient for a loss.
    """
    if kind == "none":
        return torch.zeros_like(logp)
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        # Clamped like every framework does: exp of a large log-ratio overflows to inf.
        return torch.exp((-d).clamp(max=20.0)) + d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}")


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None = 0.2) -> torch.Tensor:
    """PPO's critic loss per token: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within `clip` of the old value."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum(unclipped, (v_clipped - returns) ** 2)


def truncated_is(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                 cap: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token weights min(pi_old / mu, cap) correcting for the rollout policy mu != the trainer's.

    mu differs from pi_old when rollouts are stale (async) or merely because the engine's numerics
    are not the trainer's (fused kernels, another dtype). Returns the weights and how far apart the
    two are: mean |log ratio|, the k3 KL(mu || pi_old), and the share of truncated tokens.
    """
    log_ratio = (old_logp - rollout_logp).detach()
    w = torch.exp(log_ratio.clamp(max=20.0))
    m = mask.float()
    n = m.sum().clamp(min=1)
    stats = {"mismatch_abs": (log_ratio.abs() * m).sum() / n,
             "mismatch_max": (log_ratio.abs() * m).max() if m.any() else torch.tensor(0.0),
             "mismatch_kl": (kl(rollout_logp, old_logp.detach(), "k3") * m).sum() / n,
             "is_truncated": ((w > cap).float() * m).sum() / n}
    return w.clamp(max=cap), stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1)
