"""What `bench sft` and `bench dpo` share: the synthetic answers, the per-step clocks of both
sides, the alternating timed rounds, the thread count, and the parity facts read off a model.

Each bench builds an "ours" and a "peer" runner with `run(side, seconds) -> seconds spent`:
train until `seconds` of step time are spent (at least one step), adding every step's
(tokens, seconds) to `side`. `alternate` then runs them in rounds so that load from other
processes hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignloop.ui import console, say, set_quiet

_WORDS = (  # noqa: SIM905 (a word list reads better as prose)
    "the a model answer question simple clear idea reason because example often people water light "
    "small large time place first next then finally important careful quick slow warm cold bright "
    "river mountain city garden kitchen recipe number pattern story language music color energy "
    "plant animal friend question helpful step method result change keep make take give find show "
    "think know see use try start stop learn teach build grow read write explain compare describe"
).split()


def answer(rng: random.Random, n_words: int) -> str:
    """A made-up answer of n_words words in sentences: token statistics like chat text, content none."""
    sentences, words = [], []
    for _ in range(n_words):
        words.append(rng.choice(_WORDS))
        if len(words) >= rng.randint(6, 14):
            sentences.append(" ".join(words).capitalize() + ".")
            words = []
    if words:
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def bench_prompts() -> list[str]:
    import json
    from importlib import resources

    return json.loads(resources.files("alignloop.assets").joinpath("bench_prompts.json").read_text())


# --- clocks ------------------------------------------------------------------------------------


class RoundOver(Exception):
    """Raised from a step callback to end one time-boxed round of our loop."""


@dataclass
class Side:
    name: str
    steps: list[tuple[int, float]] = field(default_factory=list)  # (trained tokens, seconds) per timed step
    warm: bool = False  # True once the warm-up step is done

    def add(self, tokens: int, seconds: float) -> None:
        if self.warm:
            self.steps.append((tokens, seconds))
        self.warm = True

    @property
    def tokens(self) -> int:
        return sum(t for t, _ in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.steps)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def run_our_loop(module: torch.nn.Module, objective: Any, batches: Any, config: Any, workdir: Path,
                 stage_name: str, side: Side, seconds: float, round_no: int) -> float:
    """Our shared training loop for one round: until `seconds` of step time (at least one step).

    Every round is a fresh `train()` call in its own stage folder (no resume), timed by the loop's
    own per-step clock (`metrics["seconds"]`: collation, forward, backward, clipping, AdamW).
    """
    from alignloop.runs import Stage
    from alignloop.train.loop import train

    stage = Stage(workdir, f"{side.name}-{round_no}", stage_name, {"bench": side.name, "round": round_no})
    spent = 0.0

    def clock(step: int, metrics: dict[str, Any]) -> None:
        nonlocal spent
        side.add(int(metrics["tokens"]), float(metrics["seconds"]))
        spent += float(metrics["seconds"])
        if spent >= seconds:
            raise RoundOver

    with contextlib.suppress(RoundOver):
        train(module, objective, batches, config, stage, callbacks=[clock], description=f"{side.name} round {round_no}")
    return spent


class PeerClock:
    """Times a transformers `Trainer` step by step and counts the tokens its training forwards see.

    `callback()` goes into the trainer's callbacks; `count_tokens(model)` hooks the model's forward
    and counts the attention mask's ones of every forward that records gradients (a reference
    forward under no_grad is work, but not trained tokens). Step time runs from `on_step_begin`
    to `on_step_end`, which brackets data collation, forward(s), backward, clipping and the optimizer.
    """

    def __init__(self) -> None:
        self.side: Side | None = None
        self._began, self._tokens, self._spent, self._budget = 0.0, 0, 0.0, 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._began = time.perf_counter()
                clock._tokens = 0

            def on_step_end(self, args, state, control, **kwargs):
                took = time.perf_counter() - clock._began
                clock.side.add(clock._tokens, took)
                clock._spent += took
                if clock._spent >= clock._budget:
                    control.should_training_stop = True

        return Clock()

    def count_tokens(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._tokens += int(mask.sum()) if mask is not None else int(ids.numel())

    def run(self, trainer: Any, side: Side, seconds: float, seed: int) -> float:
        """`trainer.train()` until `seconds` of step time are spent (at least one step)."""
        self.side, self._spent, self._budget = side, 0.0, seconds
        # Each train() starts its data loader afresh, shuffled from the seed: a new seed per round
        # draws new batches instead of timing the same first batch again.
        trainer.args.seed = seed
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for noisy in (PrinterCallback, ProgressCallback):  # per-run summaries on stdout: the table says it all
            trainer.remove_callback(noisy)
        with warnings.catch_warnings(), hf_quiet():
            warnings.simplefilter("ignore")
            trainer.train()
        return self._spent


@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    import datasets
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's dataset preparation would print its own bars
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


# --- rounds ------------------------------------------------------------------------------------


def alternate(bench: str, runners: dict[str, Callable[[Side, float], float]], rounds: int,
              extra: tuple[str, ...] = ()) -> dict[str, Side]:
    """Run "ours" and "peer" (and any `extra` sides of ours) in alternating rounds; return the sides.

    Each round: one step of ours, then the peer for as much step time as that step took (at least
    one step), who goes first alternating, so load that comes and goes hits both alike; then one
    step of each extra side. The first step of each side is a warm-up (not counted).
    """
    sides = {name: Side(name) for name in ("ours", "peer", *extra)}
    quiet, ours_took = console.quiet, 0.0
    for r in range(1, rounds + 1):
        order = (["ours", "peer"] if r % 2 else ["peer", "ours"]) + list(extra)
        for name in order:
            set_quiet(True)  # no per-round progress bars: the table at the end says it all
            try:
                took = runners[name](sides[name], ours_took if name == "peer" else 0.0)
            finally:
                set_quiet(quiet)
            if name == "ours":
                ours_took = took
            s = sides[name]
            say(f"{bench} round {r}/{rounds} {name}: {s.tok_s:.1f} tok/s over {len(s.steps)} timed step(s)")
    return sides


def bench_threads() -> int:
    """torch's thread count, less the cores other processes keep busy (by the 1-minute load).

    Threads beyond the free cores do not add speed, they wait: every parallel op ends on a barrier
    that waits for its slowest thread, and a thread sharing a core with another process is slow.
    Measured here with ~4 other busy threads on 2 cores: one training step took 25 s with 1 thread
    and 60-110 s with 2. Both sides get the same count; the JSON line reports it.

    The load average counts this process too when it is already busy (e.g. a previous bench in the
    same process): call it before the work starts. Rounding is to the nearest core, so a load of
    0.6 on 2 cores still leaves 1 thread and a load of 0.4 leaves 2.
    """
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(torch.get_num_threads(), int(cores - busy + 0.5)))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def require_trl(bench: str) -> None:
    try:
        import trl  # noqa: F401
    except ImportError:
        from alignloop.errors import AlignloopError

        raise AlignloopError(f"bench {bench} compares with TRL: pip install trl (or the dev extra)") from None


def trl_version() -> str:
    import trl

    return trl.__version__


# --- parity facts ------------------------------------------------------------------------------


def describe(model: torch.nn.Module, **settings: Any) -> dict[str, Any]:
    """The parity facts of one side, read off the model it actually trains."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = next(iter(model.peft_config.values()))
    return {**settings, "lora_r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "lora_layers": len(layers), "trainable_params": sum(p.numel() for p in trainable),
            "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
            "base_dtype": str(layers[0].get_base_layer().weight.dtype).removeprefix("torch.")}


def table(title: str, sides: dict[str, Side]) -> None:
    from rich.table import Table

    t = Table("side", "timed steps", "trained tokens", "seconds", "tokens/s", title=title)
    for name, s in sides.items():
        if s.steps:
            t.add_row(name, str(len(s.steps)), str(s.tokens), f"{s.seconds:.1f}", f"{s.tok_s:.1f}")
    console.print(t)
