"""Advantages: how much better an episode (or a token) did than expected.

Group methods (GRPO, Dr.GRPO, RLOO, REINFORCE++-baseline) need no critic: every prompt is answered
`group` times and the episodes are compared with their siblings. Rewards come in flat, grouped
by consecutive runs of `group` (episode i belongs to prompt i // group). GAE is PPO's, with a critic.
"""

from __future__ import annotations

import torch


def _groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    rewards = rewards.float().reshape(-1)
    if group < 1 or rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}")
    return rewards.view(-1, group)


def grpo(rewards: torch.Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); scale=False is Dr.GRPO (no std division).

    Dr.GRPO drops the std because it up-weights groups that are nearly all right or all wrong
    (tiny std), a difficulty bias. A group with identical rewards gets 0 either way.
    """
    g = _groups(rewards, group)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        # Unbiased std as in DeepSeekMath / TRL; a group of one has no spread to divide by.
        std = g.std(dim=1, keepdim=True) if group > 1 else torch.ones_like(g[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """r minus the mean of the *other* group members (leave-one-out): an unbiased baseline."""
    if group < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(rewards, group)
    others = (g.sum(dim=1, keepdim=True) - g) / (group - 1)
    return (g - others).reshape(-1)


def reinforce_pp(rewards: torch.Tensor, group: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: returns normalised over the whole batch (not per group).

    group > 1 is REINFORCE++-baseline: subtract the group mean first, then normalise globally, so
    easy and hard prompts are on one scale without the per-group std of GRPO.
    """
    r = rewards.float().reshape(-1)
    if group > 1:
        g = _groups(r, group)
        r = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    if r.numel() < 2:
        return r - r.mean()
    return (r - r.mean()) / (r.std() + eps)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T] token rewards and values; returns (adv, returns).

    `mask` marks the tokens the policy produced; positions outside it get 0 advantage and do not
    carry value across (a multi-turn episode's user tokens are skipped, the next policy token's
    value bootstraps the previous one). The value after the last policy token is 0 (episode end).
    """
    rewards, values, mask = rewards.float(), values.float(), mask.bool()
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    next_value = torch.zeros(B)
    running = torch.zeros(B)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        running = torch.where(m, step, running)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, running, torch.zeros(B))
    returns = adv + values * mask
    return adv, returns


def whiten(xs: list[torch.Tensor], masks: list[torch.Tensor], eps: float = 1e-8) -> list[torch.Tensor]:
    """Normalise the masked entries of all `xs` together to mean 0 and std 1, and zero the rest:
    PPO's advantage whitening, over the whole batch though it comes in micro batches."""
    flat = torch.cat([x[m.bool()] for x, m in zip(xs, masks)]) if xs else torch.zeros(0)
    mean, std = (flat.mean(), flat.std()) if flat.numel() > 1 else (torch.tensor(0.0), torch.tensor(1.0))
    return [torch.where(m.bool(), (x - mean) / (std + eps), torch.zeros_like(x)) for x, m in zip(xs, masks)]
