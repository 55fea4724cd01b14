"""The one training loop behind every trainer (SFT, DPO, distillation).

A trainer hands the loop three things and nothing else:

- a `module` to optimise (an nn.Module: a causal LM, a LoRA-wrapped one, or a wrapper such as
  `TokenLogprobs` whose forward computes what the loss needs);
- an `Objective`: `weight(batch)` says how much a micro batch counts in the step's mean (loss
  tokens for SFT, pairs for DPO) and `loss(module, batch)` returns the *summed* loss plus summed
  statistics. The loop divides by the step's total weight before backward, so grad accumulation
  of 4 x 1 rows is the same mean as one batch of 4 rows, whatever their token counts;
- `batches(epoch)`: the micro batches of one epoch, in order, as a pure function of the epoch
  number. That is what makes resuming exact: the data position is just (epoch, index).

Each optimizer step: take `grad_accum` micro batches, forward/backward each under bf16 autocast,
clip, AdamW (fused where the build has it), advance the schedule, log, checkpoint every
`save_every` steps. On start, the newest checkpoint of the same config is restored (weights,
optimizer, scheduler, RNGs, data position), so a run killed with SIGKILL and started again ends
with the same weights, bit for bit, as one that never stopped.

Multi-process (`torchrun`, DDP or FSDP2: see `dist`): `train` joins the process group, wraps the
module, and each process forwards its share of every step's micro batches; the step's weight and
the logged statistics are sums over processes, so the global batch and the loss curve do not
depend on the number of processes. Only rank 0 writes metrics and checkpoint files.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from alignloop.errors import AlignloopError
from alignloop.runs import METRICS, Stage, config_hash, trim_jsonl
from alignloop.train import checkpoint as ckpt
from alignloop.train import dist
from alignloop.train.config import TrainSection
from alignloop.train.schedule import Schedule, make_scheduler
from alignloop.ui import progress, say


class Objective(Protocol):
    def weight(self, batch: Any) -> float:
        """How much `batch` counts in the step's mean loss (e.g. its number of loss tokens)."""
        ...

    def loss(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the batch, summed statistics).

        A statistic named `x_sum` is reported as `x` = sum / total weight; others (e.g. `tokens`,
        the non-pad tokens processed) are reported as totals per step.
        """
        ...


EpochBatches = Callable[[int], Sequence[Any]]
StepCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class LoopResult:
    steps: int                 # optimizer steps the run has done in total
    resumed_from: int          # step of the checkpoint it started from (0: fresh)
    tokens: int                # tokens processed (by all processes) in this invocation
    seconds: float             # wall time of those steps
    last: dict[str, Any] = field(default_factory=dict)  # the last step's metrics
    eval: dict[str, Any] = field(default_factory=dict)  # the last eval's metrics

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --- pieces ------------------------------------------------------------------------------------


def pick_device(choice: str = "auto") -> torch.device:
    """The device to train on; under torchrun with GPUs, this process's own GPU (LOCAL_RANK)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise AlignloopError("train.device = 'cuda' but torch sees no CUDA GPU here; use 'auto' or 'cpu'")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_optimizer(module: torch.nn.Module, config: TrainSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm gains.

    Decaying a norm's gain or a bias toward 0 regularises nothing useful and only shifts the
    function, hence the usual split on ndim.
    """
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    try:
        # One kernel over all parameters instead of a dozen elementwise passes; CPU has it since 2.4.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def total_steps(config: TrainSection, micro_batches_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * micro_batches_per_epoch / config.grad_accum))


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    # Matmuls in bf16, reductions (norms, softmax, the loss) in fp32; weights and grads stay fp32.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class BatchStream:
    """Micro batches across epoch boundaries; its position is (epoch, index) and nothing else."""

    def __init__(self, batches: EpochBatches, epoch: int = 0, index: int = 0) -> None:
        self.batches = batches
        self.epoch = epoch
        self.index = index
        self._cached: tuple[int, Sequence[Any]] | None = None

    def _epoch_items(self) -> Sequence[Any]:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.batches(self.epoch))
            if not self._cached[1]:
                raise ValueError("the training data yields no batches")
        return self._cached[1]

    def next(self) -> Any:
        items = self._advance()
        return items[self.index - 1]

    def take(self, n: int, keep: Iterable[int]) -> dict[int, Any]:
        """Advance by n micro batches; return {i: batch} for the i in `keep` only.

        Under torchrun each process keeps its own share; the rest are never built (collated).
        """
        keep = set(keep)
        out = {}
        for i in range(n):
            items = self._advance()
            if i in keep:
                out[i] = items[self.index - 1]
        return out

    def _advance(self) -> Sequence[Any]:
        items = self._epoch_items()
        if self.index >= len(items):
            self.epoch, self.index = self.epoch + 1, 0
            items = self._epoch_items()
        self.index += 1
        return items

    def epochs_done(self) -> float:
        return self.epoch + self.index / len(self._epoch_items())

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _to(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if hasattr(batch, "to") else batch


def _reduce(loss_total: float, stats: dict[str, float], weight: float) -> dict[str, float]:
    out: dict[str, float] = {"loss": loss_total / weight}
    for key, value in stats.items():
        if key.endswith("_sum"):
            out[key[: -len("_sum")]] = value / weight
        else:  # counts: keep them integers in the log
            out[key] = int(value) if float(value).is_integer() else value
    return out


def accumulate(module: torch.nn.Module, objective: Objective, micro: Sequence[Any], weight: float,
               device: torch.device, bf16: bool, *, scale: float = 1.0,
               sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
               padding: Sequence[Any] = ()) -> tuple[float, dict[str, float]]:
    """Forward and backward each micro batch, adding (loss / step weight) gradients into .grad.

    Dividing every micro batch's summed loss by the whole step's weight makes the accumulated
    gradient that of the step's mean loss, however the rows are split into micro batches.
    Returns the summed loss and statistics for logging.

    Multi-process: `scale` = the number of processes (DDP/FSDP2 average gradients, we want the
    sum over the step), `sync(last)` defers the gradient reduction to the last pass, and
    `padding` batches run with their loss times 0 so every process does as many passes as the
    busiest one; they count for nothing, in gradients or statistics.
    """
    loss_total, stats = 0.0, {}
    passes = [(b, True) for b in micro] + [(b, False) for b in padding]
    for i, (batch, real) in enumerate(passes):
        with sync(i == len(passes) - 1) if sync is not None else contextlib.nullcontext():
            with autocast(device, bf16):
                loss, batch_stats = objective.loss(module, batch)
            if not real:
                (loss * 0.0).backward()
                for k in batch_stats:
                    stats.setdefault(k, 0.0)  # same keys on every process, for the reduction
                continue
            scaled = loss / max(weight, 1e-12)
            (scaled * scale if scale != 1.0 else scaled).backward()
        loss_total += float(loss.detach())
        for k, v in batch_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return loss_total, stats


def evaluate(module: torch.nn.Module, objective: Objective, batches: Iterable[Any],
             device: torch.device, bf16: bool) -> dict[str, float]:
    """Mean loss (and statistics) over `batches`, prefixed eval_; weights and RNG untouched.

    Under torchrun each process evaluates its share (padded to equal forward counts, as FSDP2's
    forward is collective) and the sums are reduced: every process returns the same numbers.
    """
    batches = batches if isinstance(batches, Sequence) else list(batches)
    mine = dist.my_share(len(batches))
    padding = dist.passes_per_process(len(batches)) - len(mine) if batches else 0
    was_training = module.training
    module.eval()
    loss_total, weight, stats = 0.0, 0.0, {}
    with torch.no_grad(), autocast(device, bf16):
        for i in mine:
            batch = _to(batches[i], device)
            loss, batch_stats = objective.loss(module, batch)
            loss_total += float(loss)
            weight += objective.weight(batch)
            for k, v in batch_stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
        for _ in range(padding):
            _, batch_stats = objective.loss(module, _to(batches[0], device))
            for k in batch_stats:
                stats.setdefault(k, 0.0)
    module.train(was_training)
    dist.reshard(module)  # FSDP2's root stays gathered after a forward without backward
    weight = dist.all_reduce_sum(weight)
    loss_total, stats = dist.reduce_sums(loss_total, stats)
    if weight == 0:
        return {}
    return {f"eval_{k}": v for k, v in _reduce(loss_total, stats, weight).items()}


# --- the loop ----------------------------------------------------------------------------------


def train(
    module: torch.nn.Module,
    objective: Objective,
    batches: EpochBatches,
    config: TrainSection,
    stage: Stage,
    *,
    eval_batches: Sequence[Any] = (),
    callbacks: Sequence[StepCallback] = (),
    description: str = "train",
) -> LoopResult:
    """Train `module` in place; checkpoints go to `stage`'s checkpoints/, metrics to its metrics.jsonl.

    Under torchrun, every process calls this with the same arguments (see `dist`); the module is
    wrapped here (DDP, or sharded in place by FSDP2 per `config.parallel`) and rank 0 writes.
    """
    ctx = dist.init_from_env()
    device = next(module.parameters()).device
    module.train()
    steps = total_steps(config, len(batches(0)))
    strategy = dist.strategy_of(config)
    wrapped = dist.wrap(module, strategy)  # FSDP2 swaps in sharded parameters: before the optimizer
    if ctx.enabled:
        say(f"{description}: {dist.describe(ctx, strategy)}")
        if (warning := dist.warn_uneven(config.grad_accum, ctx)) is not None:
            say(warning)
    sync = dist.gradient_sync(wrapped) if ctx.enabled else None
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, Schedule(config.schedule, steps, config.warmup_for(steps),
                                                   config.min_lr_ratio))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    # Resume from the newest checkpoint, if it was made with this very config.
    root = stage.path("checkpoints")
    fingerprint = config_hash(stage.config)
    stream = BatchStream(batches)
    start, tokens_before = 0, 0
    latest = None
    if ctx.is_main:
        latest = ckpt.latest_checkpoint(root)
        if latest is not None and ckpt.read_trainer_state(latest).get("config_hash") != fingerprint:
            say(f"[yellow]checkpoints in {root} belong to another config: starting afresh[/]")
            shutil.rmtree(root, ignore_errors=True)
            latest = None
    latest = dist.broadcast_object(latest)  # every process resumes from the checkpoint rank 0 chose
    if latest is not None:
        state = ckpt.load_checkpoint(latest, module, optimizer, scheduler)
        start, tokens_before = state["step"], state.get("tokens", 0)
        stream = BatchStream(batches, state["epoch"], state["index"])
        say(f"resuming from {latest.name} ({start}/{steps} steps done)")
    if ctx.is_main:
        trim_jsonl(stage.path(METRICS), start)

    result = LoopResult(steps=start, resumed_from=start, tokens=0, seconds=0.0)
    if start >= steps:
        return result

    with progress() as bar:
        task = bar.add_task(description, total=steps, completed=start, info="")
        for step in range(start + 1, steps + 1):
            began = time.perf_counter()
            # The step's grad_accum micro batches, of which this process forwards its share;
            # one with a smaller share pads with a pass that counts for nothing (see dist).
            mine = dist.my_share(config.grad_accum, ctx)
            n_padding = dist.passes_per_process(config.grad_accum, ctx) - len(mine)
            taken = stream.take(config.grad_accum, set(mine) | ({0} if n_padding else set()))
            micro = [_to(taken[i], device) for i in mine]
            padding = [_to(taken[mine[0] if mine else 0], device)] * n_padding
            # The weight of the whole step (all processes): each divides by the global weight.
            weight = dist.all_reduce_sum(sum(objective.weight(b) for b in micro))
            lr = scheduler.get_last_lr()[0]

            optimizer.zero_grad(set_to_none=True)
            loss_total, stats = accumulate(wrapped, objective, micro, weight, device, config.bf16,
                                           scale=float(ctx.world), sync=sync, padding=padding)
            loss_total, stats = dist.reduce_sums(loss_total, stats)

            max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            grad_norm = dist.to_float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not math.isfinite(grad_norm) or not math.isfinite(loss_total):
                raise FloatingPointError(
                    f"step {step}: non-finite {'loss' if not math.isfinite(loss_total) else 'gradient'}"
                    f" (lr {lr:.2e}); the last checkpoint is intact: lower the lr or check the data")
            optimizer.step()
            scheduler.step()
            seconds = time.perf_counter() - began

            metrics = {**_reduce(loss_total, stats, max(weight, 1e-12)), "lr": lr, "grad_norm": grad_norm,
                       "epoch": stream.epochs_done(),
                       "seconds": seconds}
            step_tokens = int(stats.get("tokens", 0))
            if step_tokens:
                metrics["tokens_per_s"] = step_tokens / seconds
            result.tokens += step_tokens
            result.seconds += seconds

            if eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == steps):
                result.eval = evaluate(wrapped, objective, eval_batches, device, config.bf16)
                metrics.update(result.eval)
            if ctx.is_main:
                stage.log_metrics(step=step, **metrics)
            result.steps, result.last = step, metrics

            if step % config.save_every == 0 or step == steps:
                ckpt.save_checkpoint(
                    root, step, module, optimizer, scheduler,
                    {"config_hash": fingerprint, **stream.position(), "total_steps": steps,
                     "tokens": tokens_before + result.tokens},
                    keep=config.keep_checkpoints)
            bar.update(task, completed=step,
                       info=f"loss {metrics['loss']:.3f}" + (f" · {metrics['tokens_per_s']:.0f} tok/s"
                                                            if "tokens_per_s" in metrics else ""))
            for callback in callbacks:
                callback(step, metrics)
    return result
