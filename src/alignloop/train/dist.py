"""Multi-process training: the same trainers under `torchrun`, with DDP or FSDP2.

    torchrun --nproc_per_node 2 -m alignloop.cli train sft recipes/sft.toml
    torchrun --nproc_per_node 2 -m alignloop.cli train sft recipes/sft.toml --set train.parallel=fsdp

Nothing else changes: a trainer run without torchrun is one process of a world of one, and every
helper here is then a no-op. Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment)
`init_from_env()` joins the process group: gloo for CPU tensors, plus NCCL for CUDA tensors when
the build sees a GPU (each process then uses GPU LOCAL_RANK).

How the pieces fit, and the choices made:

- **The global batch does not depend on the world size.** One optimizer step is `grad_accum`
  micro batches of `micro_batch` rows, whatever the number of processes. Every process walks the
  same deterministic batch stream; process r forwards the step's micro batches r, r+W, r+2W, ...
  and skips the others without collating them. The step's mean divides by the *global* weight
  (loss tokens for SFT: an all-reduced sum), and each process scales its loss by W because DDP and
  FSDP2 average gradients over processes. So 2 processes x grad_accum 2 computes the same step as
  1 process x grad_accum 2, up to the order of fp32 additions (tested to 1e-5 relative).
- **Equal work per process.** DDP and FSDP2 run collectives inside backward (FSDP2 in forward
  too), so every process must do the same number of passes. When grad_accum is not a multiple of
  W, the processes with one micro batch fewer run a padding pass (a micro batch of the step with
  its loss scaled by 0): correct, but wasted work, hence a warning. Keep grad_accum a multiple
  of the number of processes.
- **DDP** (`train.parallel = "ddp"`, the default) replicates the model; gradient all-reduce is
  skipped on all but the last micro batch of a step (`no_sync`).
- **FSDP2** (`train.parallel = "fsdp"`, `torch.distributed.fsdp.fully_shard`) shards each
  transformer block (the classes the HF model lists in `_no_split_modules`) and then the root, so
  parameters, gradients and optimizer moments are 1/W per process; frozen LoRA base weights shard
  too. Gradient reduce-scatter is likewise deferred to a step's last micro batch.
- **Checkpoints are full, not sharded.** Each sharded tensor (weights, AdamW moments) is
  gathered and rank 0 writes the same files a single process writes; every process then reads
  them back on resume and keeps its own shard. A checkpoint therefore resumes under any number
  of processes and under either strategy, and `alignloop` tools read it without torch.distributed.
  The cost is one gather per checkpoint, which for the LoRA-sized and small-model runs this
  project targets is small. Per-process RNG states are all kept (rank 0's file holds them).
  Processes read the checkpoint folder from disk: on several machines it must be shared storage.
- **Rank 0 writes, everyone computes.** Metrics, checkpoints, the final model and the manifest
  are written by rank 0 only; other processes are quiet (no console output, no progress bar).
  Statistics (loss, tokens, ...) are sums all-reduced over processes before they are logged.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from alignloop.ui import set_quiet

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SINGLE = Context()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def available() -> bool:
    return tdist.is_available() and tdist.is_gloo_available()


def init_from_env() -> Context:
    """Join the torchrun process group (once); a plain `python` run is a world of one."""
    if not launched_by_torchrun() or not tdist.is_available():
        return _SINGLE
    if not tdist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and tdist.is_nccl_available():
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"  # small bookkeeping tensors stay on the CPU
        else:
            backend = "gloo"
        tdist.init_process_group(backend)
        atexit.register(_shutdown)
    ctx = context()
    if not ctx.is_main:
        set_quiet(True)  # one console: rank 0's
    return ctx


def _shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def context() -> Context:
    if not (tdist.is_available() and tdist.is_initialized()):
        return _SINGLE
    return Context(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    return context().is_main


def barrier() -> None:
    if context().enabled:
        tdist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (e.g. a decision that must be the same everywhere)."""
    if not context().enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] | None = [None] * ctx.world if ctx.is_main else None
    tdist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a one-time model conversion into the cache), then the rest."""
    ctx = context()
    if ctx.enabled and not ctx.is_main:
        tdist.barrier()
    try:
        yield
    finally:
        if ctx.enabled and ctx.is_main:
            tdist.barrier()


# --- reductions ---------------------------------------------------------------------------------


def all_reduce_sum(value: float) -> float:
    if not context().enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(t)
    return float(t[0])


def reduce_sums(total: float, stats: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(sum over processes of `total`, of each statistic); every process must pass the same keys."""
    if not context().enabled:
        return total, stats
    keys = sorted(stats)
    t = torch.tensor([total, *(stats[k] for k in keys)], dtype=torch.float64)
    tdist.all_reduce(t)
    values = t.tolist()
    return values[0], dict(zip(keys, values[1:]))


def to_float(value: torch.Tensor | float) -> float:
    """A scalar as a Python float; a DTensor (e.g. FSDP2's grad norm) is reduced first."""
    if isinstance(value, torch.Tensor):
        return float(full_tensor(value))
    return float(value)


# --- sharding the work ---------------------------------------------------------------------------


def my_share(n: int, ctx: Context | None = None) -> list[int]:
    """Indices of this process's items among n (round robin: r, r + W, ...)."""
    ctx = ctx or context()
    return list(range(ctx.rank, n, ctx.world))


def passes_per_process(n: int, ctx: Context | None = None) -> int:
    """How many passes every process runs for n items: the largest share (at least 1)."""
    ctx = ctx or context()
    return max(1, -(-n // ctx.world))


# --- wrapping ------------------------------------------------------------------------------------


def wrap(module: torch.nn.Module, strategy: str = "ddp") -> torch.nn.Module:
    """The module to call in the training step: DDP around `module`, or `module` sharded in place.

    Single process: `module` itself. DDP returns a wrapper (keep using the inner `module` for
    parameter names, the optimizer and checkpoints); FSDP2 changes `module` in place (its
    parameters become DTensor shards, so build the optimizer *after* wrapping) and returns it.
    """
    ctx = context()
    if not ctx.enabled:
        return module
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    device = next(module.parameters()).device
    if strategy == "ddp":
        # Nothing buffered changes during training (rotary tables are constants): no syncing in
        # forward. Newer torch renames the switch (and still syncs once at init, which is harmless).
        no_sync_buffers = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync_buffers)
    # torch.distributed's submodules exist only in builds with distributed support (checked above).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world,))
    blocks = _block_classes(module)
    for sub in list(module.modules()):
        if sub is not module and type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)  # the rest: embeddings, final norm, head (tied or not)
    return module


def _block_classes(module: torch.nn.Module) -> set[str]:
    """Class names of the transformer blocks: what HF models list in `_no_split_modules`."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return names


def reshard(module: torch.nn.Module) -> None:
    """Put FSDP2 parameters back in their sharded form.

    The root module keeps its parameters gathered after a forward that has no backward (an
    eval), registered as plain tensors: parameter names and the optimizer's parameters would
    then disagree. Call this before reading parameters (checkpoints, final state).
    """
    for sub in unwrap(module).modules():
        if hasattr(sub, "reshard") and hasattr(sub, "set_requires_gradient_sync"):  # FSDPModule
            sub.reshard()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def gradient_sync(wrapped: torch.nn.Module) -> Callable[[bool], contextlib.AbstractContextManager]:
    """`sync(last)`: a context for one micro batch; gradients are reduced only when `last`."""
    if isinstance(wrapped, DistributedDataParallel):
        return lambda last: contextlib.nullcontext() if last else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_sync(last: bool) -> Iterator[None]:
            wrapped.set_requires_gradient_sync(last)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return fsdp_sync
    return lambda last: contextlib.nullcontext()


# --- full tensors from shards, and back ---------------------------------------------------------


@dataclass(frozen=True)
class ExpertShard:
    """Tag of a parameter holding one slice (along dim 0) of a routed-expert tensor under expert
    parallelism (`alignloop.train.expert_parallel`): the slice at `position` of `size` equal ones,
    spread over `group`."""

    group: Any
    size: int
    position: int


def expert_shard(t: Any) -> ExpertShard | None:
    return getattr(t, "expert_shard", None)


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor  # absent from torch builds without distributed support

    return isinstance(t, DTensor) or expert_shard(t) is not None


def full_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor `t` is (a shard of): a DTensor's own, an expert shard's times its size."""
    spec = expert_shard(t)
    return torch.Size((t.shape[0] * spec.size, *t.shape[1:])) if spec is not None else t.shape


def full_tensor(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor behind a shard (a collective: every process must call it), on CPU.

    `like`: the parameter `t` belongs to (an optimizer moment of an expert shard is a plain tensor;
    its parameter carries the tag)."""
    spec = expert_shard(like if like is not None else t)
    if spec is not None and t.shape == (like if like is not None else t).shape:
        parts = [torch.empty_like(t) for _ in range(spec.size)]
        tdist.all_gather(parts, t.detach().contiguous(), group=spec.group)
        return torch.cat(parts)
    if is_sharded(t):
        t = t.full_tensor()
    return t.detach()


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered (a collective); plain CPU tensors."""
    reshard(module)
    params = dict(unwrap(module).named_parameters())  # state_dict()'s tensors lose the expert tags
    return {name: full_tensor(params.get(name, t)).cpu() for name, t in unwrap(module).state_dict().items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `like`: this process's shard when `like` is a DTensor or an expert
    shard, else unchanged."""
    spec = expert_shard(like)
    if spec is not None:
        n = like.shape[0]
        return full[spec.position * n:(spec.position + 1) * n].clone()
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor  # sharded: distributed is there

    # Every process holds the full tensor (read from the checkpoint): take the local slice, no comms.
    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                             src_data_rank=None)


def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(shard_like(full.to(param.dtype), param))


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float, *, expert_group: Any = None,
                   reduce: bool = True) -> float:
    """The norm of the whole model's gradient, and every gradient scaled to `max_norm` when above it
    (coefficient max_norm / (norm + 1e-6), as `torch.nn.utils.clip_grad_norm_`). Collective when
    gradients are sharded: FSDP2 shards sum over all processes, expert shards over `expert_group`.

    Why not torch's: on CPU its fp32 vector norm accumulates in fp32 and drifts on large tensors
    (measured: 5.7e-5 relative on a 49152 x 96 embedding gradient, 2.5e-5 on tiny-deepseek's whole
    gradient), which moves the clip coefficient by as much and breaks the 1e-5 agreement between a
    sharded run and its single-process reference. sum(g * g) uses a pairwise reduction: exact to ~1e-7.
    """
    grads = [p.grad for p in params if p.grad is not None]
    parts: dict[str, list[torch.Tensor]] = {"plain": [], "fsdp": [], "expert": []}
    for p in params:
        if p.grad is None:
            continue
        kind = "expert" if expert_shard(p) is not None else "fsdp" if is_sharded(p.grad) else "plain"
        local = p.grad.to_local() if kind == "fsdp" else p.grad
        parts[kind].append(local.float().pow(2).sum())
    # One device-to-host copy per kind, not one per parameter.
    sums = {k: (torch.stack(v).double().sum().cpu() if v else torch.zeros((), dtype=torch.float64))
            for k, v in parts.items()}
    if reduce and context().enabled:
        if any(is_sharded(g) for g in grads):
            tdist.all_reduce(sums["fsdp"])
        if any(expert_shard(p) is not None for p in params):
            tdist.all_reduce(sums["expert"], group=expert_group)
    norm = float(sum(sums.values()).sqrt())
    if math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for g in grads:
            g.mul_(coef)
    return norm


def strategy_of(config: Any) -> str:
    """The recipe's `train.parallel.strategy` (a config object without it gets DDP)."""
    parallel = getattr(config, "parallel", None)
    return getattr(parallel, "strategy", None) or parallel or "ddp"


def warn_uneven(grad_accum: int, ctx: Context | None = None) -> str | None:
    ctx = ctx or context()
    if ctx.enabled and grad_accum % ctx.world:
        return (f"[yellow]warning: grad_accum={grad_accum} is not a multiple of the {ctx.world} processes: "
                f"some run padding passes each step (correct, but wasted work). The global batch is "
                f"micro_batch x grad_accum rows at any world size: e.g. halve micro_batch and double "
                f"grad_accum.[/]")
    return None


def describe(ctx: Context | None = None, strategy: str | None = None) -> str:
    ctx = ctx or context()
    if not ctx.enabled:
        return "1 process"
    backend = tdist.get_backend() if tdist.is_initialized() else "?"
    return f"{ctx.world} processes ({strategy or 'ddp'}, {backend})"


__all__: Sequence[str] = (
    "Context",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "context",
    "copy_into",
    "full_state_dict",
    "full_tensor",
    "gather_objects",
    "gradient_sync",
    "init_from_env",
    "is_main",
    "main_first",
    "my_share",
    "passes_per_process",
    "reduce_sums",
    "shard_like",
    "strategy_of",
    "to_float",
    "unwrap",
    "wrap",
)
