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
clip, AdamW (fused where the build has it), advance the schedule, log (`metrics.MetricLog`:
metrics.jsonl and the trackers of `train.track`), checkpoint every `save_every` steps. On start,
the newest checkpoint of the same config is restored (`checkpoint.resume`: weights, optimizer,
scheduler, RNGs, data position), so a run killed with SIGKILL and started again ends with the
same weights, bit for bit, as one that never stopped. A NaN or an infinity in a step's loss,
gradient norm or eval stops the run before the update, in one line naming the step and the
checkpoint a rerun resumes from: nothing non-finite reaches the weights, metrics.jsonl or a checkpoint.

Multi-process (`torchrun`, DDP or FSDP2: see `dist`): `train` joins the process group, wraps the
module, and each process forwards its share of every step's micro batches; the step's weight and
the logged statistics are sums over processes, so the global batch and the loss curve do not
depend on the number of processes. Only rank 0 writes metrics and checkpoint files.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from alignloop.errors import AlignloopError
from alignloop.runs import Stage
from alignloop.train import checkpoint as ckpt
from alignloop.train import dist, expert_parallel, moe_balance
from alignloop.train.checkpoint import resume
from alignloop.train.config import TrainSection
from alignloop.train.metrics import MetricLog, NonFiniteError, require_finite
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


def make_optimizer(module: torch.nn.Module, config: TrainSection,
                   also: Sequence[tuple[torch.nn.Module, float]] = ()) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm gains.

    Decaying a norm's gain or a bias toward 0 regularises nothing useful and only shifts the
    function, hence the usual split on ndim. `also`: (module, peak lr) pairs trained alongside
    at their own rate (e.g. a LoRA backbone under reward heads); the schedule scales every group.
    """
    groups = [g for m, lr in ((module, config.lr), *also) for g in _decay_groups(m, lr, config.weight_decay)]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    try:
        # One kernel over all parameters instead of a dozen elementwise passes; CPU has it since 2.4.
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def _decay_groups(module: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay, "lr": lr},
                        {"params": no_decay, "weight_decay": 0.0, "lr": lr}) if g["params"]]


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


@dataclass
class _Trainee:
    """What one optimizer step works on: the module as called (wrapped) and its optimizer."""

    module: torch.nn.Module     # as built by the trainer: parameter names, checkpoints
    wrapped: torch.nn.Module    # as called in the step: DDP around `module`, or `module` itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sync: Callable[[bool], contextlib.AbstractContextManager] | None
    device: torch.device
    ep: expert_parallel.ExpertParallel | None = None  # routed experts split across processes

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def _prepare(module: torch.nn.Module, config: TrainSection, steps: int, ctx: dist.Context,
             description: str) -> _Trainee:
    strategy = dist.strategy_of(config)
    # Both swap in sharded parameters, so they come before the optimizer. Expert parallelism
    # reduces gradients itself (two groups), so its module is called unwrapped.
    ep = expert_parallel.setup(module, getattr(config, "parallel", None))
    wrapped = module if ep is not None else dist.wrap(module, strategy)
    if ctx.enabled:
        say(f"{description}: {dist.describe(ctx, strategy)}"
            + (f"; {expert_parallel.describe(ep)}" if ep is not None else ""))
        if (warning := dist.warn_uneven(config.grad_accum, ctx)) is not None:
            say(warning)
    if ctx.is_main and (warning := _warmup_past_the_end(config, steps)) is not None:
        say(warning)
    optimizer = make_optimizer(module, config)
    scheduler = make_scheduler(optimizer, Schedule(config.schedule, steps, config.warmup_for(steps),
                                                   config.min_lr_ratio))
    sync = dist.gradient_sync(wrapped) if ctx.enabled and ep is None else None
    return _Trainee(module, wrapped, optimizer, scheduler, sync, next(module.parameters()).device, ep)


def _warmup_past_the_end(config: TrainSection, steps: int) -> str | None:
    """A warning when `train.warmup_steps` outlasts the run (the schedule caps it at the run's length).

    A warning, not an error: shortening a recipe's run for a quick try (`--set train.steps=1`) is a
    legitimate use, and that run still trains; but its lr reaches `train.lr` only on its last step.
    """
    if config.warmup_steps is None or config.warmup_steps <= steps:
        return None
    return (f"[yellow]warning: train.warmup_steps = {config.warmup_steps} is longer than the run's {steps} steps: "
            f"the whole run warms up and reaches train.lr only on its last step[/]")


def _step(t: _Trainee, objective: Objective, stream: BatchStream, config: TrainSection, ctx: dist.Context,
          step: int, after_step: Callable[[], dict[str, float]] | None = None) -> dict[str, Any]:
    """One optimizer step over the next `grad_accum` micro batches; its metrics.

    `after_step`: called once after the update, its numbers join the step's metrics (MoE models:
    the router-bias update and the step's expert load, `moe_balance.Balancer.after_step`)."""
    began = time.perf_counter()
    # The step's grad_accum micro batches, of which this process forwards its share;
    # one with a smaller share pads with a pass that counts for nothing (see dist).
    mine = dist.my_share(config.grad_accum, ctx)
    n_padding = dist.passes_per_process(config.grad_accum, ctx) - len(mine)
    taken = stream.take(config.grad_accum, set(mine) | ({0} if n_padding else set()))
    micro = [_to(taken[i], t.device) for i in mine]
    padding = [_to(taken[mine[0] if mine else 0], t.device)] * n_padding
    # The weight of the whole step (all processes): each divides by the global weight.
    weight = dist.all_reduce_sum(sum(objective.weight(b) for b in micro))
    lr = t.scheduler.get_last_lr()[0]

    t.optimizer.zero_grad(set_to_none=True)
    loss_total, stats = accumulate(t.wrapped, objective, micro, weight, t.device, config.bf16,
                                   scale=float(ctx.world), sync=t.sync, padding=padding)
    loss_total, stats = dist.reduce_sums(loss_total, stats)

    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    if t.ep is not None:
        t.ep.reduce_gradients(t.trainable)
        grad_norm = t.ep.clip_grad_norm(t.trainable, max_norm)
    else:
        grad_norm = dist.clip_grad_norm(t.trainable, max_norm)
    metrics = {**_reduce(loss_total, stats, max(weight, 1e-12)), "lr": lr, "grad_norm": grad_norm}
    # Before the update: one NaN in the weights would poison every later step and checkpoint.
    # Every process sees the same reduced numbers, so all of them stop here together.
    require_finite(metrics)
    t.optimizer.step()
    t.scheduler.step()
    if after_step is not None:
        metrics.update(after_step())
    if t.ep is not None:
        metrics.update(t.ep.step_metrics())
    seconds = time.perf_counter() - began
    metrics.update(epoch=stream.epochs_done(), seconds=seconds)
    if "ep/a2a_s" in metrics:
        metrics["ep/a2a_share"] = round(metrics["ep/a2a_s"] / seconds, 4)
    if stats.get("tokens"):
        metrics["tokens_per_s"] = int(stats["tokens"]) / seconds
    return metrics


@contextlib.contextmanager
def _stops_cleanly(step: int, stage: Stage) -> Iterator[None]:
    """A non-finite step stops the run in one line naming the step and the checkpoint a rerun
    resumes from; nothing of the step is logged or saved."""
    try:
        yield
    except NonFiniteError as e:
        raise AlignloopError(f"step {step}: {e}: lower train.lr or check the data; "
                             f"{ckpt.what_is_intact(stage.path('checkpoints'))}") from None


def _progress_info(metrics: dict[str, Any]) -> str:
    speed = f" · {metrics['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in metrics else ""
    return f"loss {metrics['loss']:.3f}{speed}"


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
    """Train `module` in place; checkpoints go to `stage`'s checkpoints/, metrics to its metrics.jsonl
    (and the trackers of `config.track`).

    Under torchrun, every process calls this with the same arguments (see `dist`); the module is
    wrapped here (DDP, or sharded in place by FSDP2 per `config.parallel`) and rank 0 writes.
    """
    ctx = dist.init_from_env()
    module.train()
    steps = total_steps(config, len(batches(0)))
    t = _prepare(module, config, steps, ctx, description)
    balancer = moe_balance.balancer_for(module, config)  # None for a dense model
    if balancer is not None and t.ep is not None:
        balancer.all_reduce = t.ep.syncs  # the "none" diagnostic leaves even the counts unsynced
    if balancer is not None and balancer.alpha > 0:
        objective = moe_balance.BalancedObjective(objective, balancer, moe_balance.top_k_of(module))
    # Resume from the newest checkpoint, if it was made with this very config.
    state = resume(stage, lambda path: ckpt.load_checkpoint(path, module, t.optimizer, t.scheduler), steps,
                   label=description)
    start, tokens_before = state["step"], state.get("tokens", 0)
    stream = BatchStream(batches, state.get("epoch", 0), state.get("index", 0))
    result = LoopResult(steps=start, resumed_from=start, tokens=0, seconds=0.0)
    if start >= steps:
        return result

    fingerprint = stage.work_hash()
    log = MetricLog(stage, config.track, start=start, enabled=ctx.is_main)
    with progress() as bar, contextlib.closing(log):
        task = bar.add_task(description, total=steps, completed=start, info="")
        for step in range(start + 1, steps + 1):
            with _stops_cleanly(step, stage):
                metrics = _step(t, objective, stream, config, ctx, step,
                                balancer.after_step if balancer is not None else None)
                if eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == steps):
                    result.eval = evaluate(t.wrapped, objective, eval_batches, t.device, config.bf16)
                    metrics.update(result.eval)
                    require_finite(result.eval)
            result.tokens += int(metrics.get("tokens", 0))
            result.seconds += metrics["seconds"]
            log.log(step, metrics)
            result.steps, result.last = step, metrics
            if step % config.save_every == 0 or step == steps:
                ckpt.save_checkpoint(
                    stage.path("checkpoints"), step, module, t.optimizer, t.scheduler,
                    {"config_hash": fingerprint, **stream.position(), "total_steps": steps,
                     "tokens": tokens_before + result.tokens},
                    keep=config.keep_checkpoints)
            bar.update(task, completed=step, info=_progress_info(metrics))
            for callback in callbacks:
                callback(step, metrics)
    if balancer is not None and ctx.is_main:
        moe_balance.plot_maxvio(stage.path("metrics.jsonl"), stage.path(moe_balance.PLOT_FILE))
    return result
