"""Expert parallelism for DeepSeek-style MoE models: routed experts split across processes, tokens
sent to their experts by all-to-all, and each kind of parameter reduced over its own group.

    torchrun --nproc_per_node 2 -m alignloop.cli train sft RECIPE --set train.parallel.expert=2

Layout. W processes, expert-parallel size e (dividing W and the E routed experts). Ranks
g*e .. g*e + e-1 form expert group g; inside it, the rank at position j holds experts
[j*E/e, (j+1)*E/e). Ranks at the same position j of every group hold the same experts: their
expert-data-parallel group (W/e ranks). Everything else (embeddings, MLA, norms, dense FFNs, the
router's weight and bias, the shared experts, MTP blocks, the head) is replicated on every rank.
Every rank forwards its own share of each step's micro batches, as under DDP (see `dist`).

One MoE layer's forward, on each rank: the (replicated) router picks K experts per token; the
(token, expert) pairs are sorted by expert, which makes the pairs bound for each rank contiguous;
the per-expert counts go out first (a small all-to-all), then the token vectors; each rank runs its
own experts on what it received and sends the outputs back the way they came; the gating weights
multiply them on the token's own rank. Both exchanges are differentiable (backward sends gradients
the opposite way), so an expert's gradient on its rank already holds every token of its expert
group that was routed to it.

Gradient reduction, after the step's last micro batch. The loop multiplies each rank's loss by W
(as for DDP, which averages), so the *sum* over ranks is the gradient of the global mean, and:
- replicated parameters are summed over all W ranks, then divided by W;
- routed experts are summed over their expert-data-parallel group only (W/e ranks), then divided
  by W. Reducing them over the expert group as well adds other experts' gradients into each one:
  the replicas still agree with each other and every expert is wrong. That is why "the replicas
  agree" is no test, and why `grad_sync = "experts_too"` exists: a diagnostic that does exactly
  that, beside `grad_sync = "none"` (no reduction at all);
- the router bias is not a gradient: `update_router_bias` all-reduces the per-expert token counts
  over all ranks and every rank takes the same sign step.
Clipping uses the norm of the whole model's gradient: replicated parts counted once, expert shards
summed over the expert group. Megatron-LM and DeepSpeed reduce the same two groups; we do it by
hand in two flat buckets because DDP can reduce over one group only and FSDP2 has no expert axis.

Capacity. By default nothing is dropped: the exchange sizes follow the routing. With
`capacity_factor = c`, a rank sends at most ceil(c * N * K / E) of its N tokens to any one expert;
the pairs over that skip their routed expert (the shared experts still see the token) and are
counted: `ep/dropped` per step, summed over ranks and layers, and `ep/dropped_frac`.

Checkpoints stay whole: an expert shard is gathered over its expert group (`dist.full_tensor`, as
for an FSDP2 shard), rank 0 writes the files one process writes, and loading slices each rank's
experts back out (`dist.shard_like`), so a checkpoint moves between world sizes and EP sizes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from alignloop.errors import AlignloopError
from alignloop.models.deepseek import Experts, MoE
from alignloop.train import dist
from alignloop.train.config import ParallelSection


@dataclass(frozen=True)
class Layout:
    """Who holds what among W ranks with expert-parallel size e."""

    world: int
    rank: int
    size: int  # e

    @property
    def position(self) -> int:  # j: which slice of the experts this rank holds
        return self.rank % self.size

    def expert_ranks(self, group: int) -> list[int]:
        return [group * self.size + j for j in range(self.size)]

    def expert_data_ranks(self, position: int) -> list[int]:
        return [g * self.size + position for g in range(self.world // self.size)]


@dataclass
class Clock:
    """Seconds spent in the all-to-all exchanges (including waiting for the slower rank)."""

    seconds: float = 0.0


@dataclass
class Counters:
    pairs: int = 0    # (token, expert) pairs routed on this rank
    dropped: int = 0  # of which over capacity


class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks in `send` sized runs; `recv` sized runs come back. Backward: reversed."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group, clock: Clock):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group, ctx.clock = send, recv, group, clock
        return _exchange(x, send, recv, group, clock)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.group, ctx.clock), None, None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group, clock: Clock) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    began = time.perf_counter()
    tdist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    clock.seconds += time.perf_counter() - began
    return out


class ShardedExperts(nn.Module):
    """This rank's slice of a layer's routed experts, and the exchange that feeds them.

    Same parameter names as `Experts` (gate_up_proj [E/e, 2I, D], down_proj [E/e, D, I]), each
    tagged as an expert shard for `dist`'s gather and slice. Drop-in for `MoE.experts`.
    """

    def __init__(self, full: Experts, layout: Layout, group, clock: Clock, counters: Counters,
                 capacity_factor: float | None) -> None:
        super().__init__()
        self.n_experts = full.gate_up_proj.shape[0]
        self.per_rank = self.n_experts // layout.size
        first = layout.position * self.per_rank
        self.layout, self.group, self.clock, self.counters = layout, group, clock, counters
        self.capacity_factor = capacity_factor
        shard = dist.ExpertShard(group, layout.size, layout.position)
        for name in ("gate_up_proj", "down_proj"):
            whole = getattr(full, name)
            part = nn.Parameter(whole.detach()[first:first + self.per_rank].clone(), requires_grad=whole.requires_grad)
            part.expert_shard = shard  # type: ignore[attr-defined]
            setattr(self, name, part)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_k w[n, k] * expert_{idx[n, k]}(x[n]) for this rank's tokens x [N, D], whichever rank
        holds the expert. Collective: every rank of the expert group runs it, layer by layer."""
        E, per, e = self.n_experts, self.per_rank, self.layout.size
        N, K = idx.shape
        pairs = idx.flatten()
        order = pairs.argsort(stable=True)
        expert, token, weight = pairs[order], order // K, w.flatten()[order]
        self.counters.pairs += expert.numel()
        if self.capacity_factor is not None:
            keep = _within_capacity(expert, E, math.ceil(self.capacity_factor * N * K / E))
            self.counters.dropped += int((~keep).sum())
            expert, token, weight = expert[keep], token[keep], weight[keep]

        send_counts = torch.bincount(expert, minlength=E)  # [E]: already grouped by destination rank
        recv_counts = _exchange(send_counts, [per] * e, [per] * e, self.group, self.clock)
        received_from = recv_counts.view(e, per)  # [source rank, local expert]
        send = send_counts.view(e, per).sum(1).tolist()
        recv = received_from.sum(1).tolist()
        received = _AllToAll.apply(x[token], send, recv, self.group, self.clock)

        # What arrived is ordered (source, expert); the experts want it (expert, source).
        segment = torch.repeat_interleave(torch.arange(e * per, device=x.device), received_from.flatten())
        by_expert = ((segment % per) * e + segment // per).argsort(stable=True)
        chunks = received[by_expert].split(received_from.sum(0).tolist())
        outs = []
        for chunk, gate_up, down in zip(chunks, self.gate_up_proj.unbind(0), self.down_proj.unbind(0)):
            if chunk.shape[0]:
                gate, up = F.linear(chunk, gate_up).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down))
        # With nothing received, `received * 0` keeps the (empty) graph: every rank must run the
        # backward exchange, or the ranks that did receive tokens would wait forever.
        done = torch.cat(outs).to(x.dtype) if outs else received * 0
        back = _AllToAll.apply(done[by_expert.argsort()], recv, send, self.group, self.clock)
        y = back * weight[:, None].to(back.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _within_capacity(expert: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """For pairs sorted by expert: True for the first `capacity` pairs of each expert."""
    counts = torch.bincount(expert, minlength=n_experts)
    start = torch.cumsum(counts, 0) - counts
    return torch.arange(expert.numel(), device=expert.device) - start[expert] < capacity


@dataclass
class ExpertParallel:
    """The loop's handle on an expert-parallel module: reduce, clip, and report each step."""

    module: nn.Module
    layout: Layout
    expert_group: object
    expert_data_group: object
    grad_sync: str = "correct"
    check_replicas: bool = False
    clock: Clock = field(default_factory=Clock)
    counters: Counters = field(default_factory=Counters)

    @property
    def syncs(self) -> bool:
        return self.grad_sync != "none"

    def reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replicated gradients summed over all ranks, expert gradients over their expert-data
        group (both / W); `grad_sync` diagnostics change exactly this. Collective."""
        if self.grad_sync == "none":
            return
        replicated = [p for p in params if not is_expert(p)]
        experts = [p for p in params if is_expert(p)]
        W = self.layout.world
        _all_reduce_bucket(replicated, None, W)
        if self.grad_sync == "experts_too":
            _all_reduce_bucket(experts, None, W)  # the bug: other experts' gradients mixed in
        else:
            _all_reduce_bucket(experts, self.expert_data_group, W)

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """The whole model's gradient norm (expert shards summed over the expert group), clipped."""
        return dist.clip_grad_norm(params, max_norm, expert_group=self.expert_group, reduce=self.syncs)

    def step_metrics(self) -> dict[str, float]:
        """This step's exchange time (this rank), dropped pairs (all ranks), replica check; resets."""
        out: dict[str, float] = {"ep/a2a_s": round(self.clock.seconds, 4)}
        counts = torch.tensor([self.counters.pairs, self.counters.dropped], dtype=torch.float64)
        if self.syncs:
            tdist.all_reduce(counts)
        out["ep/dropped"] = int(counts[1])
        out["ep/dropped_frac"] = float(counts[1] / counts[0]) if counts[0] else 0.0
        if self.check_replicas:
            out["ep/replica_divergence"] = replica_divergence(self.module)
        self.clock.seconds, self.counters.pairs, self.counters.dropped = 0.0, 0, 0
        return out


def is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "expert_shard", None) is not None


def _all_reduce_bucket(params: Sequence[torch.Tensor], group, world: int) -> None:
    """Sum the gradients of `params` over `group` in one flat collective, then divide by `world`.

    Every rank must send the same bucket, so a parameter without a gradient here (no token reached
    it) joins as zeros; one flag per parameter rides along, and a parameter no rank had a gradient
    for (e.g. an MTP block the objective does not use) gets None back, as in a single process,
    where AdamW then leaves it (and its weight decay) alone."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), had])
    if group is None or tdist.get_world_size(group) > 1:
        tdist.all_reduce(flat, group=group)
    offset = 0
    for i, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        anyone = bool(flat[flat.numel() - len(params) + i] > 0)
        p.grad = (flat[offset:offset + n] / world).view_as(g).to(g.dtype) if anyone else None
        offset += n


@torch.no_grad()
def replica_divergence(module: nn.Module) -> float:
    """max over replicated parameters of |p - p on rank 0| / |p on rank 0|, over all ranks
    (0 when the replicas agree). Collective: one broadcast of the replicated parameters."""
    params = [p for p in dist.unwrap(module).parameters() if not is_expert(p)]
    mine = torch.cat([p.detach().reshape(-1).float() for p in params])
    theirs = mine.clone()
    tdist.broadcast(theirs, src=0)
    worst, offset = 0.0, 0
    for p in params:
        n = p.numel()
        a, b = mine[offset:offset + n], theirs[offset:offset + n]
        worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-30)))
        offset += n
    box = torch.tensor([worst], dtype=torch.float64)
    tdist.all_reduce(box, op=tdist.ReduceOp.MAX)
    return float(box[0])


def make_groups(layout: Layout) -> tuple[object, object]:
    """(this rank's expert group, its expert-data-parallel group). Collective: every rank creates
    every group, in the same order, as torch.distributed requires."""
    mine: list[object] = [None, None]
    for g in range(layout.world // layout.size):
        group = tdist.new_group(layout.expert_ranks(g))
        if layout.rank in layout.expert_ranks(g):
            mine[0] = group
    for j in range(layout.size):
        group = tdist.new_group(layout.expert_data_ranks(j))
        if layout.rank in layout.expert_data_ranks(j):
            mine[1] = group
    return mine[0], mine[1]


def setup(module: nn.Module, parallel: ParallelSection | None) -> ExpertParallel | None:
    """Shard `module`'s routed experts in place per `parallel.expert` (None when off, or when this is
    a world of one). Call before building the optimizer: the expert parameters are replaced."""
    ctx = dist.context()
    size = getattr(parallel, "expert", 1)
    if parallel is None or size <= 1 or not ctx.enabled:
        return None
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise AlignloopError("train.parallel.expert > 1 needs an MoE model (e.g. model.name = 'tiny-deepseek')")
    if ctx.world % size:
        raise AlignloopError(f"train.parallel.expert = {size} does not divide the {ctx.world} processes")
    n_experts = layers[0].experts.gate_up_proj.shape[0]
    if n_experts % size:
        raise AlignloopError(f"train.parallel.expert = {size} does not divide the {n_experts} routed experts")
    layout = Layout(ctx.world, ctx.rank, size)
    expert_group, expert_data_group = make_groups(layout)
    ep = ExpertParallel(module, layout, expert_group, expert_data_group, parallel.grad_sync, parallel.check_replicas)
    for layer in layers:
        if isinstance(layer.experts, Experts):
            layer.experts = ShardedExperts(layer.experts, layout, expert_group, ep.clock, ep.counters,
                                           parallel.capacity_factor)
    return ep


def active(module: nn.Module) -> bool:
    """Whether `module`'s forward exchanges tokens between ranks (every rank must run each forward)."""
    return any(isinstance(m, ShardedExperts) for m in module.modules())


def describe(ep: ExpertParallel) -> str:
    lay = ep.layout
    return (f"expert parallel: {lay.world // lay.size} group(s) of {lay.size} ranks, "
            f"experts split {lay.size} ways; gradients: {ep.grad_sync}")
