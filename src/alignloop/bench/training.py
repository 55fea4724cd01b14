"""What `bench sft`, `bench dpo` and `bench grpo` share: the synthetic answers, the LoRA both sides
train, the per-step clocks of both sides, a TRL trainer set up the same way for every bench, the
fixed thread count, and the parity facts read off a model.

Each side runs in rounds of optimizer steps, timed step by step by its own clock (ours: the
loop's per-step seconds; TRL: its step callbacks), adding every step's useful tokens, seconds and
computed tokens (padding included) to a `Side`:
- `run_steps(side, n)`: exactly n steps; `step_rounds` makes that a configuration for the
  harness's `alternate_rounds` (warm-up, >= 3 rounds, order flipping), as `bench sft`/`dpo` use it;
- `run(side, seconds)`: until `seconds` of step time are spent (at least one step), for
  `alternate` (one side's step time sets the other's budget).
The thread count is fixed (`run_against_trl`, through the harness's `fixed_threads`), never
guessed from the load; the load is only reported.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from rich.table import Table
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from alignloop.bench.harness import fixed_threads
from alignloop.errors import AlignloopError
from alignloop.models import load_model
from alignloop.runs import Stage
from alignloop.train.logprobs import TokenLogprobs
from alignloop.train.loop import train
from alignloop.train.lora import add_lora
from alignloop.ui import console, say, set_quiet

# The LoRA both sides of every training bench put on the model (ours as a LoraSection, TRL's as peft's).
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}

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


# --- clocks ------------------------------------------------------------------------------------


class RoundOver(Exception):
    """Raised from a step callback to end one time-boxed round of our loop."""


@dataclass
class Side:
    """One side's timed steps: (useful tokens, seconds) each, plus the tokens it computed.

    `useful` are the real (non-pad) tokens a step trains on; `computed` are all the tokens its
    training forward and backward ran through, padding included. The first `add` is the warm-up
    unless the side starts `warm`.
    """

    name: str
    steps: list[tuple[int, float]] = field(default_factory=list)  # (useful tokens, seconds) per timed step
    warm: bool = False  # True once the warm-up step is done
    computed: list[int] = field(default_factory=list)  # tokens through forward/backward per timed step

    def add(self, tokens: int, seconds: float, computed: int | None = None) -> None:
        if self.warm:
            self.steps.append((tokens, seconds))
            self.computed.append(tokens if computed is None else computed)
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

    def result(self) -> dict[str, Any]:
        """What the harness's rounds take: useful and computed tokens, seconds, steps."""
        return {"useful": self.tokens, "computed": sum(self.computed), "seconds": self.seconds,
                "steps": len(self.steps)}


def step_rounds(run: Callable[[Side, int], None], name: str, steps: int) -> Callable[[], dict[str, Any]]:
    """A harness configuration: each call runs `steps` timed steps of one side (`run(side, steps)`)
    and returns their `Side.result()`."""
    def one_round() -> dict[str, Any]:
        side = Side(name, warm=True)
        run(side, steps)
        return side.result()

    return one_round


def tokens_per_step(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Each side's useful and computed tokens per optimizer step, over all its timed rounds."""
    def per_step(rounds: list[dict[str, Any]], key: str) -> int:
        return round(sum(r[key] for r in rounds) / sum(r["steps"] for r in rounds))

    return {side: {"useful": per_step(rs, "useful"), "computed": per_step(rs, "computed")}
            for side, rs in results.items()}


class OurSide:
    """Our side of a training bench: the model with `LORA` adapters, trained by our loop in rounds.

    torch is seeded with `seed` before the adapters are made, as on TRL's side. `config` is the
    stage's train section (its `lora` is `LORA`).
    """

    def __init__(self, model: torch.nn.Module, config: Any, workdir: Path, seed: int) -> None:
        torch.manual_seed(seed)
        self.config, self.workdir, self.seed, self.rounds = config, workdir, seed, 0
        self.model = add_lora(model, config.lora)
        self.module = TokenLogprobs(self.model)

    def setup(self, batch: int, **settings: Any) -> dict[str, Any]:
        """The parity facts (`describe`) with our batch, lr, clipping and precision."""
        c = self.config
        return describe(self.model, batch=batch, grad_accum=c.grad_accum, lr=c.lr, max_grad_norm=c.max_grad_norm,
                        bf16_autocast=c.bf16, **settings)

    def train_round(self, objective: Any, batches: Any, stage_name: str, side: Side, seconds: float,
                    steps: int | None = None) -> float:
        """One round: `steps` steps, or (steps None) until `seconds` of step time are spent (at least
        one step); returns the time spent.

        Every round is a fresh `train()` call in its own stage folder (no resume), on `batches`
        drawn afresh for the round (seed + round, as TRL's side draws its rows), timed by the loop's
        own per-step clock (`metrics["seconds"]`: collation, forward, backward, clipping, AdamW).
        Each step adds (its non-pad tokens, seconds, the tokens of its padded batches) to `side`.
        """
        self.rounds += 1
        batches.seed = self.seed + self.rounds
        stage = Stage(self.workdir, f"{side.name}-{self.rounds}", stage_name,
                      {"bench": side.name, "round": self.rounds})
        counted = ComputedTokens(batches)
        spent, done = 0.0, 0

        def clock(step: int, metrics: dict[str, Any]) -> None:
            nonlocal spent, done
            side.add(int(metrics["tokens"]), float(metrics["seconds"]), counted.take())
            spent += float(metrics["seconds"])
            done += 1
            if (steps is not None and done >= steps) or (steps is None and spent >= seconds):
                raise RoundOver

        with contextlib.suppress(RoundOver):
            train(self.module, objective, counted, self.config, stage, callbacks=[clock],
                  description=f"{side.name} round {self.rounds}")
        return spent


class ComputedTokens:
    """`batches(epoch)` as given, counting the tokens (padding included) of every batch the loop takes.

    `take()` returns the count since the last call: called from the step callback, that is the
    tokens of the step's batches.
    """

    def __init__(self, batches: Callable[[int], Any]) -> None:
        self.batches, self._count = batches, 0

    def __call__(self, epoch: int) -> Any:
        items = self.batches(epoch)
        counter = self

        class Counted(Sequence):
            def __len__(self) -> int:
                return len(items)

            def __getitem__(self, i):
                batch = items[i]
                counter._count += padded_tokens(batch)
                return batch

        return Counted()

    def take(self) -> int:
        n, self._count = self._count, 0
        return n


def padded_tokens(batch: Any) -> int:
    """The token slots of one of our batches, padding included (packed SFT rows or DPO pair rows)."""
    packed = getattr(batch, "packed", batch)
    return int(packed.input_ids.numel())


class PeerClock:
    """Times a transformers `Trainer` step by step and counts the tokens its training forwards see.

    `callback()` goes into the trainer's callbacks; `count_tokens(model)` hooks the model's forward
    and counts, for every forward that records gradients, the real tokens (the attention mask's
    ones, or every token when there is no mask, as with padding-free batches) and the computed ones
    (every slot of `input_ids`, padding included). A reference forward under no_grad is work, but
    not trained tokens. Step time runs from `on_step_begin` to `on_step_end`, which brackets
    data collation, forward(s), backward, clipping and the optimizer.
    """

    def __init__(self) -> None:
        self.side: Side | None = None
        self._began, self._tokens, self._computed, self._spent, self._budget = 0.0, 0, 0, 0.0, 0.0
        self._steps, self._step_budget = 0, None

    def callback(self) -> Any:
        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock._began = time.perf_counter()
                clock._tokens = clock._computed = 0

            def on_step_end(self, args, state, control, **kwargs):
                took = time.perf_counter() - clock._began
                clock.side.add(clock._tokens, took, clock._computed)
                clock._spent += took
                clock._steps += 1
                if clock._step_budget is not None:
                    if clock._steps >= clock._step_budget:
                        control.should_training_stop = True
                elif clock._spent >= clock._budget:
                    control.should_training_stop = True

        return Clock()

    def count_tokens(self, model: torch.nn.Module) -> None:
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._tokens += int(mask.sum()) if mask is not None else int(ids.numel())
            self._computed += int(ids.numel())

    def run(self, trainer: Any, side: Side, seconds: float, seed: int, steps: int | None = None) -> float:
        """`trainer.train()` for `steps` steps, or (steps None) until `seconds` of step time are
        spent (at least one step); returns the step time spent."""
        self.side, self._spent, self._budget = side, 0.0, seconds
        self._steps, self._step_budget = 0, steps
        # Each train() starts its data loader afresh, shuffled from the seed: a new seed per round
        # draws new batches instead of timing the same first batch again.
        trainer.args.seed = seed
        for noisy in (PrinterCallback, ProgressCallback):  # per-run summaries on stdout: the table says it all
            trainer.remove_callback(noisy)
        with warnings.catch_warnings(), hf_quiet():
            warnings.simplefilter("ignore")
            trainer.train()
        return self._spent


@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    """transformers' logging at errors only and no `datasets` or TRL progress bars, for the block."""
    import datasets  # comes with TRL, an optional extra: only the TRL side needs it

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's dataset preparation would print its own bars
    tqdm_disable = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # e.g. DPOTrainer's reference precompute pass reads it
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()
        if tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_disable


def peer_lora_config() -> LoraConfig:
    """`LORA` as peft's config, for TRL's side."""
    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM", bias="none")


def trl_config(config_cls: Callable[..., Any], output_dir: str | Path, batch: int, lr: float, max_steps: int,
               grad_accum: int = 1, **settings: Any) -> Any:
    """A TRL trainer config at its defaults but for: CPU, `batch` rows per forward and `grad_accum`
    forwards per optimizer step, `lr`, bf16 autocast (TRL's default, said outright; `bf16=False`
    in `settings` turns it off), a step cap, no checkpoints or reports, and `settings`."""
    settings = {"bf16": True, **settings}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return config_cls(output_dir=str(output_dir), use_cpu=True, per_device_train_batch_size=batch,
                          gradient_accumulation_steps=grad_accum, max_steps=max_steps, learning_rate=lr,
                          save_strategy="no", report_to="none", **settings)


class TrlPeer:
    """A TRL trainer on the bench's rows, with `LORA`, timed by a `PeerClock` and run in rounds.

    `trainer_cls` is the TRL trainer and `make_args()` its config; `trainer_kwargs` go to the
    trainer as they are (e.g. GRPO's reward function); `chat_template` replaces the tokenizer's
    (e.g. one with generation markers). The model is loaded in `dtype`, torch is
    seeded with `seed` before the adapters are made, and the trainer is built with HF's warnings
    and logs muted. `count_tokens`: hook the model to count the tokens its training forwards see.
    `run(side, seconds)` is this side's runner for `alternate`: round r trains with seed `seed + r`.
    """

    def __init__(self, trainer_cls: Callable[..., Any], model_name: str, make_args: Callable[[], Any],
                 rows: list[dict[str, Any]], seed: int, dtype: str = "bfloat16", count_tokens: bool = True,
                 chat_template: str | None = None, **trainer_kwargs: Any) -> None:
        from datasets import Dataset  # comes with TRL, an optional extra

        model, tokenizer = load_model(model_name, dtype=dtype)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        torch.manual_seed(seed)
        self.seed, self.rounds = seed, 0
        self.clock = PeerClock()
        with warnings.catch_warnings(), hf_quiet():
            warnings.simplefilter("ignore")
            self.trainer = trainer_cls(
                model=model, args=make_args(), processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                peft_config=peer_lora_config(), callbacks=[self.clock.callback()], **trainer_kwargs)
        if count_tokens:
            self.clock.count_tokens(self.trainer.model)

    def setup(self, **settings: Any) -> dict[str, Any]:
        """The parity facts (`describe`) with the trainer's batch, lr, clipping and precision."""
        args = self.trainer.args
        return {**describe(self.trainer.model, batch=args.per_device_train_batch_size,
                           grad_accum=args.gradient_accumulation_steps, lr=args.learning_rate,
                           max_grad_norm=args.max_grad_norm, bf16_autocast=bool(args.bf16), **settings),
                "gradient_checkpointing": bool(args.gradient_checkpointing) or checkpointing(self.trainer.model)}

    def run(self, side: Side, seconds: float) -> float:
        """Train until `seconds` of step time are spent (at least one step); return the time spent."""
        self.rounds += 1
        return self.clock.run(self.trainer, side, seconds, self.seed + self.rounds)

    def run_steps(self, side: Side, steps: int) -> None:
        """Train exactly `steps` steps (round r draws its batches with seed `seed + r`)."""
        self.rounds += 1
        self.clock.run(self.trainer, side, 0.0, self.seed + self.rounds, steps=steps)


def check_dtype(dtype: str) -> None:
    """A bench's `--dtype`: bfloat16 (bf16 weights, bf16 autocast) or float32 (fp32 weights, no autocast)."""
    if dtype not in ("bfloat16", "float32"):
        raise AlignloopError(f"--dtype {dtype}: use bfloat16 or float32")


def enum_value(value: Any) -> Any:
    """A transformers enum setting (e.g. `optim`) as its plain value, for the JSON line."""
    return getattr(value, "value", value)


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether any module of `model` has activation (gradient) checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


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


def load_average() -> float:
    """The 1-minute load average, for the record only (the JSON line states the conditions).

    It never picks the thread count: threads are fixed by `--threads` (harness.fixed_threads)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def run_against_trl(bench: str, threads: int | None, body: Callable[[float], dict]) -> dict:
    """`body(load)` at the bench's fixed torch thread count (`threads`, None = every core this
    process may run on), once TRL is known to be installed; `load` is the 1-minute load average
    taken before the work starts, reported, never used to choose threads."""
    require_trl(bench)
    load = load_average()
    with fixed_threads(threads):
        return body(load)


def closing_facts(sides: dict[str, Side], ours_setup: dict[str, Any], peer_setup: dict[str, Any], load: float,
                  started: float) -> dict[str, Any]:
    """What every training bench's JSON line ends with: steps timed, each side's setup, the machine."""
    return {"timed_steps": {k: len(v.steps) for k, v in sides.items() if v.steps},
            "ours_setup": ours_setup, "peer_setup": peer_setup,
            "torch_threads": torch.get_num_threads(), "load_at_start": round(load, 1),
            "seconds": round(time.perf_counter() - started, 1)}


def require_trl(bench: str) -> None:
    try:
        import trl  # noqa: F401  (an optional extra: this checks it is there)
    except ImportError:
        raise AlignloopError(f"bench {bench} compares with TRL: pip install trl (or the dev extra)") from None


def trl_version() -> str:
    import trl  # optional extra, checked by require_trl before any bench runs

    return trl.__version__


# --- parity facts ------------------------------------------------------------------------------


def describe(model: torch.nn.Module, **settings: Any) -> dict[str, Any]:
    """The parity facts of one side, read off the model it actually trains."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = next(iter(model.peft_config.values()))
    return {**settings, "lora_r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "lora_layers": len(layers), "trainable_params": sum(p.numel() for p in trainable),
            "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
            "base_dtype": str(layers[0].get_base_layer().weight.dtype).removeprefix("torch.")}


def table(title: str, sides: dict[str, Side]) -> None:
    t = Table("side", "timed steps", "trained tokens", "seconds", "tokens/s", title=title)
    for name, s in sides.items():
        if s.steps:
            t.add_row(name, str(len(s.steps)), str(s.tokens), f"{s.seconds:.1f}", f"{s.tok_s:.1f}")
    console.print(t)
