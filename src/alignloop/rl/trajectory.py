"""One episode as token ids, and micro batches of episodes for the trainer.

Token-in, token-out: a trajectory keeps the exact ids the engine saw and produced (never a
re-tokenization of the text), `policy[i]` says whether token i was sampled from the policy (only
those carry loss: the prompt, user turns, tool results and template tokens do not), and
`rollout_logp[i]` is the engine's log-prob of it, kept for the importance-sampling correction.

Routing replay (MoE policies): `routing` keeps the experts the engine chose for each token it fed
([moe_layers, n, K], n <= len(tokens)), and the batch hands them to the trainer's forward, so both
route every token alike and their log-probs differ only by numerics. In a multi-turn episode the
routing is that of the last generation call, which re-read the whole conversation: earlier replies'
tokens were sampled under their own turn's routing, which no single replay can reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Trajectory:
    tokens: list[int]
    policy: list[bool]           # per token: sampled from the policy
    rollout_logp: list[float]    # per token: the engine's log-prob (0.0 where not policy)
    reward: float = 0.0
    group: int = 0               # episodes with the same group answered the same task
    messages: list[dict] = field(default_factory=list)  # the conversation as text, for samples/logs
    info: dict[str, Any] = field(default_factory=dict)  # env extras (answer, correct, turns, ...)
    truncated: bool = False      # hit the token budget before finishing
    task: Any = None             # what the environment was reset with (e.g. a simulated user's id)
    routing: torch.Tensor | None = None  # MoE: the engine's experts per fed token [moe_layers, n, K]

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.policy) == len(self.rollout_logp)):
            raise ValueError(f"trajectory: {len(self.tokens)} tokens, {len(self.policy)} policy flags, "
                             f"{len(self.rollout_logp)} log-probs")

    @property
    def n_policy(self) -> int:
        return sum(self.policy)

    def append(self, ids: list[int], policy: bool, logp: list[float] | None = None) -> None:
        self.tokens.extend(ids)
        self.policy.extend([policy] * len(ids))
        self.rollout_logp.extend(logp if logp is not None else [0.0] * len(ids))


@dataclass
class Batch:
    """Right-padded rows; the [B, T] tensors are aligned with the *targets* (position t predicts token t+1)."""

    input_ids: torch.Tensor      # [B, L]
    position_ids: torch.Tensor   # [B, L]
    allowed: torch.Tensor        # [B, 1, L, L] bool
    select: torch.Tensor         # [B, L] bool: positions whose next token is a policy token
    targets: torch.Tensor        # [N] the policy tokens, row-major
    mask: torch.Tensor           # [B, L-1] bool: select without its last column
    rollout_logp: torch.Tensor   # [B, L-1]
    index: list[int]             # which trajectories of the step these rows are
    routing: list[torch.Tensor] | None = None  # per MoE layer [B, L, K]: the engine's experts, -1 where none

    def to(self, device: torch.device) -> Batch:
        if torch.device(device).type == "cpu":
            return self
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        if self.routing is not None:
            moved["routing"] = [r.to(device) for r in self.routing]
        return Batch(**moved)

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] values in row-major select order -> [B, L-1] (zeros off the mask)."""
        out = torch.zeros(self.mask.shape, dtype=flat.dtype, device=flat.device)
        return out.masked_scatter(self.mask, flat)


def collate(trajectories: list[Trajectory], index: list[int], pad_id: int = 0) -> Batch:
    B = len(trajectories)
    L = max(len(t.tokens) for t in trajectories)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    policy = torch.zeros(B, L, dtype=torch.bool)
    rollout = torch.zeros(B, L)
    real = torch.zeros(B, L, dtype=torch.bool)
    for i, t in enumerate(trajectories):
        n = len(t.tokens)
        ids[i, :n] = torch.tensor(t.tokens)
        policy[i, :n] = torch.tensor(t.policy)
        rollout[i, :n] = torch.tensor(t.rollout_logp)
        real[i, :n] = True
    if policy[:, 0].any():
        raise ValueError("a trajectory starts with a policy token: nothing to condition it on")
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    # Padding attends to itself only: a fully masked query row would make sdpa return NaN.
    allowed = (causal[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool)[None]
    mask = policy[:, 1:]
    select = torch.zeros(B, L, dtype=torch.bool)
    select[:, :-1] = mask
    return Batch(input_ids=ids, position_ids=torch.arange(L).expand(B, L).contiguous(),
                 allowed=allowed[:, None], select=select, targets=ids[:, 1:][mask], mask=mask,
                 rollout_logp=rollout[:, 1:], index=index,
                 routing=_routing([[(t, 0, 0, len(t.tokens))] for t in trajectories], L))


def shared_prefix(trajectories: list[Trajectory]) -> int:
    """How many leading tokens all of them share and none of them trains on (the token right
    before the first policy token is left out: its hidden state predicts that token)."""
    first = min(t.policy.index(True) if True in t.policy else len(t.tokens) for t in trajectories)
    n = max(first - 1, 0)
    head = trajectories[0].tokens
    for t in trajectories[1:]:
        k = 0
        while k < n and t.tokens[k] == head[k]:
            k += 1
        n = k
    return n


def collate_shared(rows: list[list[int]], trajectories: list[Trajectory], pad_id: int = 0) -> Batch:
    """Micro batch where each row is one prompt's group packed as [shared prefix, reply 1, reply 2, ...].

    A GRPO group answers one prompt `group` times; scored one sequence per row, the prompt (often
    longer than the replies: SmolLM2's template alone adds ~30 tokens) goes through the model
    `group` times. Here it goes through once: every reply segment attends to the shared prefix and
    causally to itself, with position ids continuing from the prefix, which is exactly the
    attention each sequence sees alone (the prefix, being causal, never sees any reply). The
    prefix's keys and values are one set of activations, so gradients from every reply add up in it
    as they would over the copies.

    `rows[r]` lists trajectory positions (into `trajectories`) packed in row r; the flat order of
    `select` (row-major) is the trajectories in the order of `rows`, each token in order, which is
    the row-major order of `mask` ([n, T], one row per trajectory in that same order).
    """
    order = [i for row in rows for i in row]
    packed, positions, docs, selects, pieces = [], [], [], [], []
    for row in rows:
        members = [trajectories[i] for i in row]
        n = shared_prefix(members) if len(members) > 1 else 0
        ids, pos, doc, sel = list(members[0].tokens[:n]), list(range(n)), [0] * n, [False] * n
        pieces.append([(members[0], 0, 0, n)])  # routing: the prefix's from the first member
        for d, t in enumerate(members, start=1):
            seg = t.tokens[n:]
            pieces[-1].append((t, n, len(ids), len(seg)))
            ids += seg
            pos += range(n, n + len(seg))
            doc += [d] * len(seg)
            sel += t.policy[n + 1:] + [False]  # position j predicts token j+1 of the same sequence
        packed.append(ids), positions.append(pos), docs.append(doc), selects.append(sel)
    R, L = len(rows), max(len(x) for x in packed)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R, L, dtype=torch.long)
    doc = torch.full((R, L), -1, dtype=torch.long)  # -1: padding
    select = torch.zeros(R, L, dtype=torch.bool)
    for r in range(R):
        n = len(packed[r])
        ids[r, :n], position_ids[r, :n] = torch.tensor(packed[r]), torch.tensor(positions[r])
        doc[r, :n], select[r, :n] = torch.tensor(docs[r]), torch.tensor(selects[r])
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same = doc[:, :, None] == doc[:, None, :]
    to_prefix = (doc[:, None, :] == 0) & (doc[:, :, None] >= 0)
    allowed = causal[None] & (same | to_prefix)
    allowed |= torch.eye(L, dtype=torch.bool)[None]  # padding attends to itself: no all-masked row
    loss_view = collate([trajectories[i] for i in order], order, pad_id)  # the [n, T] layout of the loss
    if int(select.sum()) != int(loss_view.mask.sum()):
        raise AssertionError("shared-prefix packing lost policy tokens")
    return Batch(input_ids=ids, position_ids=position_ids, allowed=allowed[:, None], select=select,
                 targets=_targets(ids, select), mask=loss_view.mask,
                 rollout_logp=loss_view.rollout_logp, index=order, routing=_routing(pieces, L))


def _routing(rows: list[list[tuple[Trajectory, int, int, int]]], L: int) -> list[torch.Tensor] | None:
    """Per MoE layer [R, L, K] long: row r takes, for each (trajectory, from, to, n) piece, the
    trajectory's routing of tokens from..from+n at positions to..to+n; -1 where none was recorded
    (padding, the last token, which the engine never fed). None unless every trajectory has routing."""
    if any(t.routing is None for row in rows for t, *_ in row):
        return None
    layers, _, K = rows[0][0][0].routing.shape
    out = torch.full((layers, len(rows), L, K), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        for t, src, dst, n in row:
            n = max(0, min(n, t.routing.shape[1] - src))
            out[:, r, dst:dst + n] = t.routing[:, src:src + n].long()
    return list(out.unbind(0))


def _targets(ids: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    return nxt[select]
