"""`alignloop bench grpo`: one GRPO step, our local RL loop vs TRL's `GRPOTrainer` at its best.

Work, the same on both sides: SmolLM2-135M with LoRA (r 16, alpha 32, no dropout, all linear
layers); 8 fixed arithmetic prompts (rendered by the model's chat template to the same token ids)
x 8 generations, sampled at temperature 1 with no top-p/top-k, up to 64 new tokens, stopping at
the same end-of-turn ids; the reward, one Python function both sides call on the decoded replies
(the arithmetic task's exact-answer + format reward plus a small length term, continuous so that
groups have spread: with all-equal rewards in a group our trainer skips those sequences exactly,
which would flatter us); group-normalised advantages (mean and std of each prompt's 8), token-level
(DAPO) aggregation, clip 0.2 both ways, no KL term (beta 0, so no reference model), one iteration
per batch; all 64 completions generated at once, then trained 16 per forward/backward (4 gradient
accumulations, `MICRO_BATCH`) into one AdamW step, lr 1e-5 constant, gradients clipped at 1.0.
fp32 weights and no autocast on both sides by default (`--dtype bfloat16`: bf16 weights, fp32
adapters and bf16 autocast on both; measure which wins on the CPU at hand), no
gradient checkpointing on either.

Metric: seconds per step (lower is better; the ratio is TRL's over ours), i.e. generation +
reward + forward/backward + optimizer step (+ on our side the weight sync into the engine, which
TRL's generation on the training model itself does not need). TRL is timed between its
`on_step_begin` and `on_step_end` callbacks, which bracket its generation too; model loading is
timed on neither side. Rounds (the shared harness): one untimed warm-up step per side, then
`rounds` >= 3 rounds of one step each, the order flipping every round; median s/step with min/max.

TRL, as its docs recommend for speed, and as far as a CPU allows (`peer_settings`, all in the line):
- `gradient_checkpointing=False` (GRPOConfig defaults to True, which recomputes every layer's
  forward in the backward: memory for speed, the wrong trade here);
- generation: vLLM in colocate mode (`use_vllm=True`, `vllm_mode="colocate"`, TRL's default
  importance-sampling correction), the speed-up guide's first advice, when vLLM imports; otherwise
  transformers' `generate` on the path measured fastest on this CPU (`PEER_GENERATION`, see there);
- per-step extras off: `logging_steps` past the end (no per-step log), `log_completions=False`
  (its default); TRL still computes its metrics and, in its fused LM head, every completion
  token's entropy, which no setting turns off; `lr_scheduler_type="constant"` as ours;
- the rest at TRL's defaults: the fused LM head (projects only completion positions), sdpa
  attention, AdamW, torch.compile off. The guide's other items (Liger kernels, FlashAttention or
  Hub attention kernels) are Triton/CUDA only.

What differs, inherent to each design, stated:
- TRL's training forward runs every completion as its own row: the prompt 64 times, rows padded
  to the longest prompt and completion; ours packs each prompt's group into one row with the
  prompt computed once (exact: same attention per sequence). `tokens` counts both.
- TRL's `generate` decodes all 64 rows until the longest is done (finished rows keep computing);
  our engine retires finished rows (continuous batching). `tokens.generation_slots` counts both.
- Our engine keeps its own copy of the weights, so ours syncs the merged LoRA weights into it each
  step (timed, `split.sync`), and corrects the engine-vs-trainer numeric gap by truncated
  importance sampling (cap 2; a few elementwise ops); TRL generates with the training model.

The JSON line carries each side's median time split (generation / scoring / training / other),
token accounting, the parity facts read off each side, TRL's settings, and the machine.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignloop.bench.harness import alternate_rounds, headline, machine_facts
from alignloop.bench.training import (
    LORA,
    Side,
    TrlPeer,
    checkpointing,
    describe,
    enum_value,
    load_average,
    run_against_trl,
    trl_version,
)
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.models import load_model
from alignloop.rl.arithmetic import ArithmeticEnv, score
from alignloop.rl.config import RLSection
from alignloop.rl.inference import Inference
from alignloop.rl.rollout import encode, play, render
from alignloop.rl.trainer import Trainer
from alignloop.rl.weights import policy_weights
from alignloop.train.config import LoraSection
from alignloop.train.lora import add_lora
from alignloop.ui import console, say, set_quiet

PROMPTS = 8
GENERATIONS = 8
MAX_TOKENS = 64
LR = 1e-5
CLIP = 0.2
# Completions per forward/backward, both sides (4 of them per optimizer step). Without gradient
# checkpointing, TRL's activations for all 64 rows (~136 tokens each, fp32) in one forward came
# to ~17 GB here and the process was OOM-killed on this 24 GB machine; 16 per forward is what
# fits, and it is our trainer's micro batch too.
MICRO_BATCH = 16
SEED = 0

# TRL's generation path without vLLM. Measured here through TRL's own `_generate_single_turn` on
# the bench's 64 prompts (SmolLM2-135M + LoRA, fp32, 64 new tokens, 1 thread, paths alternating,
# CPU seconds per generated token, as the machine was shared): "generate" (dynamic KV cache, TRL's
# default) 21.5 / 21.2 ms; "static" (`cache_implementation="static"`) 22.1 / 22.1 ms; "cb"
# (`use_transformers_continuous_batching`, paged continuous batching; with its default config it
# sized its KV cache from free memory, 12 GB, and was OOM-killed, so given 64 pages and 8192 batch
# tokens) 31.4 / 37.4 ms. Continuous batching retires finished rows, but its per-step scheduling
# and paged attention cost more than that saves on a CPU; static cache gains nothing without
# torch.compile. So: transformers `generate`, TRL's default.
PEER_GENERATION = "generate"
PEER_GENERATIONS = ("generate", "static", "cb")

# Our aggregation names -> TRL's `loss_type` for the same aggregation.
TRL_LOSS = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


# --- the work ------------------------------------------------------------------------------------


def bench_problems(n: int = PROMPTS):
    return ArithmeticEnv().sample_tasks(n, seed=SEED)


def bench_reward(text: str, answer: int) -> float:
    reward, _, _ = score(text, answer)
    return reward + 0.2 * min(len(text), 200) / 200


def sampling() -> dict[str, Any]:
    """The generation settings both sides use (each side's config is checked against it)."""
    return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_TOKENS}


def objective() -> dict[str, Any]:
    """The objective both sides optimise (each side's config is checked against it)."""
    return {"loss": "dapo", "clip": [CLIP, CLIP], "beta": 0.0, "iterations": 1, "scale_rewards": "group",
            "lr": LR, "lr_schedule": "constant", "max_grad_norm": 1.0, "completions_per_step": PROMPTS * GENERATIONS,
            "generations_per_prompt": GENERATIONS, "micro_batch": MICRO_BATCH, "gradient_checkpointing": False}


class _BenchEnv:
    """The arithmetic env with the bench reward."""

    name = "bench"

    def __init__(self) -> None:
        self.inner = ArithmeticEnv()

    def sample_tasks(self, n: int, seed: int):
        return bench_problems(n)

    def reset(self, tasks):
        return self.inner.reset(tasks)

    def step(self, actions):
        step = self.inner.step(actions)
        step.rewards = np.array([bench_reward(a or "", p.answer) for a, p in zip(actions, self.inner._episodes)])
        return step


@contextlib.contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to `into[key]`."""
    began = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - began


def wrap(obj: Any, name: str, around: Callable[..., Any]) -> None:
    """Replace the bound method `obj.name` by `around(original, *args, **kwargs)` on this instance only."""
    original = getattr(obj, name)
    setattr(obj, name, lambda *args, **kwargs: around(original, *args, **kwargs))


# --- our side ------------------------------------------------------------------------------------


def rl_section(dtype: str = "float32") -> RLSection:
    return RLSection(algorithm="dapo", prompts_per_step=PROMPTS, group=GENERATIONS, steps=1_000_000, lr=LR,
                     clip_low=CLIP, clip_high=CLIP, scale_rewards=True, beta=0.0, epochs=1, max_grad_norm=1.0,
                     lora=LoraSection(**LORA), bf16=dtype == "bfloat16", micro_batch=MICRO_BATCH, tis_cap=2.0,
                     schedule="constant", seed=SEED)


class Ours:
    """Our RL step as `alignloop rl` runs it locally: engine rollouts, Trainer step, weight sync."""

    def __init__(self, model_name: str, dtype: str = "float32") -> None:
        self.cfg = rl_section(dtype)
        model, self.tokenizer = load_model(model_name, dtype=dtype)
        # The engine copies the weights into its own fused buffers: built before the adapters exist.
        self.engine = Engine(model, self.tokenizer, dtype=dtype, max_batch=PROMPTS * GENERATIONS,
                             show_progress=False)
        self.inference = Inference(self.engine)
        torch.manual_seed(SEED)
        self.model = add_lora(model, self.cfg.lora)
        self.trainer = Trainer(self.model, self.cfg, 1.0, self.tokenizer.pad_token_id or 0, MAX_TOKENS)
        self.env = _BenchEnv()
        s = sampling()
        self.params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                     max_tokens=s["max_new_tokens"])
        self.n = 0
        self._batches: list[Any] = []
        wrap(self.trainer, "_micro_batches", self._keep_batches)

    def _keep_batches(self, original, *args, **kwargs):
        self._batches = original(*args, **kwargs)
        return self._batches

    def prompt_ids(self) -> list[list[int]]:
        """The token ids of the 8 prompts, as our rollouts start them."""
        return [encode(self.tokenizer, render(self.tokenizer, obs, True))
                for obs in self.env.reset(bench_problems())]

    def step(self) -> dict[str, Any]:
        """One GRPO step, timed from the rollout's start to the engine holding the updated weights.

        `split`: generation (the engine), scoring (the env's reward, with rendering and tokenizing
        the prompts), training (Trainer.step), sync (merging the adapters, loading the engine)."""
        self.n += 1
        began = time.perf_counter()
        rollout = play(self.env, self.inference, self.tokenizer, bench_problems(), GENERATIONS, self.params,
                       seed=SEED + self.n)
        train = self.trainer.step(rollout.trajectories)
        synced = time.perf_counter()
        self.inference.offer(policy_weights(self.model), version=self.n)  # merge the adapters, hand them over
        self.inference.apply_pending()  # ... and load them into the engine
        seconds = time.perf_counter() - began
        generated = sum(t.n_policy for t in rollout.trajectories)
        return {"useful": generated, "seconds": seconds,
                "split": {"generation": rollout.seconds["generation"], "scoring": rollout.seconds["environment"],
                          "training": train["train_seconds"], "sync": seconds - (synced - began)},
                "tokens": {"generated": generated,
                           # the engine retires a row at its stop token: it decodes the useful tokens only
                           "generation_slots": int(self.engine.stats.get("generated_tokens", generated)),
                           "trained": sum(int(b.mask.sum()) for b in self._batches),
                           "training_positions": sum(int(b.input_ids.numel()) for b in self._batches)},
                "skipped": int(train["skipped_sequences"]),
                "reward": float(np.mean([t.reward for t in rollout.trajectories]))}

    def describe(self) -> dict[str, Any]:
        c, s = self.cfg, sampling()
        return {**describe(self.model, lr=c.lr, max_grad_norm=c.max_grad_norm, bf16_autocast=c.bf16),
                **s, "loss": TRL_LOSS[c.agg], "clip": [c.clip_low, c.high], "beta": c.beta, "iterations": c.epochs,
                "scale_rewards": "group" if c.scale else "none", "lr_schedule": c.schedule,
                "completions_per_step": c.prompts_per_step * c.group, "generations_per_prompt": c.group,
                "gradient_checkpointing": checkpointing(self.model), "micro_batch": c.micro_batch,
                "stop_ids": sorted(self.engine.eos_ids)}


# --- TRL's side ----------------------------------------------------------------------------------


def vllm_problem() -> str | None:
    """Why TRL cannot use vLLM here (None: it imports)."""
    if importlib.util.find_spec("vllm") is None:
        return "not importable here"
    try:
        importlib.import_module("vllm")
    except Exception as e:  # a broken install fails in many ways; the line says which
        return f"not importable here ({type(e).__name__})"
    return None


def peer_generation_settings(generation: str) -> dict[str, Any]:
    """The GRPOConfig settings of one generation path: "vllm" (colocate), "generate", "static", "cb"."""
    if generation == "vllm":
        return {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 512}
    if generation == "static":
        return {"cache_implementation": "static"}
    if generation == "cb":
        # One 256-token page per request (prompt + reply < 256) for all 64 at once, and every prompt
        # prefilled in one batch; left to itself it sizes the cache from free memory (see above).
        return {"use_transformers_continuous_batching": True,
                "transformers_continuous_batching_config": {"num_blocks": PROMPTS * GENERATIONS,
                                                            "max_batch_tokens": 8192}}
    if generation == "generate":
        return {}
    raise AlignloopError(f"unknown TRL generation path {generation!r}: one of vllm, {', '.join(PEER_GENERATIONS)}")


def peer_settings(generation: str, dtype: str = "float32") -> dict[str, Any]:
    """Every GRPOConfig setting the bench gives TRL beyond output dir, CPU and seed (see the docstring)."""
    s, o = sampling(), objective()
    return {"bf16": dtype == "bfloat16", "gradient_checkpointing": False, "learning_rate": o["lr"],
            "lr_scheduler_type": o["lr_schedule"], "max_grad_norm": o["max_grad_norm"],
            # one generation of all 64 completions per optimizer step (steps_per_generation defaults
            # to the accumulation steps), trained 16 per forward; DAPO's normalisation is over the
            # whole accumulated batch, so the loss is that of one batch of 64
            "per_device_train_batch_size": o["micro_batch"],
            "gradient_accumulation_steps": o["completions_per_step"] // o["micro_batch"],
            "num_generations": o["generations_per_prompt"], "max_completion_length": s["max_new_tokens"],
            "temperature": s["temperature"], "top_p": s["top_p"], "top_k": s["top_k"], "loss_type": o["loss"],
            "epsilon": o["clip"][0], "epsilon_high": o["clip"][1], "beta": o["beta"],
            "num_iterations": o["iterations"], "scale_rewards": o["scale_rewards"], "max_steps": 1,
            "logging_steps": 1_000_000, "log_completions": False, "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, **peer_generation_settings(generation)}


def peer_config(output_dir: str | Path, generation: str = PEER_GENERATION, dtype: str = "float32"):
    from trl import GRPOConfig  # optional extra, checked by require_trl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOConfig(output_dir=str(output_dir), use_cpu=True, seed=SEED, **peer_settings(generation, dtype))


def peer_reward(completions, answer, **kwargs) -> list[float]:
    """`bench_reward` as TRL calls a reward function: a batch of completions and their answers."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [bench_reward(t, a) for t, a in zip(texts, answer)]


class Peer(TrlPeer):
    """TRL's GRPOTrainer at its best here (see the module docstring), one step per call.

    Its time split and token counts come from wrapping, on this trainer instance only, the methods
    that generate (`_generate_single_turn`), score (`_calculate_rewards`) and build the batch
    (`_generate_and_score_completions`); the wrappers time and count, nothing else.
    """

    def __init__(self, model_name: str, workdir: Path, generation: str = PEER_GENERATION,
                 dtype: str = "float32") -> None:
        from trl import GRPOTrainer  # optional extra, checked by require_trl

        self.generation = generation
        env = ArithmeticEnv()
        self.rows = [{"prompt": env.messages(p), "answer": p.answer} for p in bench_problems()]
        super().__init__(GRPOTrainer, model_name, lambda: peer_config(workdir / "trl", generation, dtype), self.rows,
                         SEED, dtype=dtype, count_tokens=False, reward_funcs=peer_reward)
        self._split: dict[str, float] = {}
        self._tokens: dict[str, int] = {}
        self._rewards: list[float] = []
        t = self.trainer
        wrap(t, "_generate_single_turn", self._time_generation)
        wrap(t, "_calculate_rewards", self._time_scoring)
        wrap(t, "_generate_and_score_completions", self._time_rollout)

    def _time_generation(self, original, *args, **kwargs):
        with timed(self._split, "generation"):
            return original(*args, **kwargs)

    def _time_scoring(self, original, *args, **kwargs):
        with timed(self._split, "scoring"):
            rewards = original(*args, **kwargs)
        self._rewards = rewards.sum(dim=1).tolist()
        return rewards

    def _time_rollout(self, original, *args, **kwargs):
        with timed(self._split, "rollout"):
            batch = original(*args, **kwargs)
        rows, width = batch["completion_ids"].shape
        generated = int(batch["completion_mask"].sum())
        self._tokens = {
            "generated": generated,
            # `generate` decodes every row until the longest is done; continuous batching retires rows
            "generation_slots": generated if self.generation in ("cb", "vllm") else rows * width,
            "trained": generated,
            "training_positions": rows * (batch["prompt_ids"].shape[1] + width)}
        return batch

    def prompt_ids(self) -> list[list[int]]:
        """The token ids of the 8 prompts, as TRL tokenizes them for generation."""
        ids, _, _ = self.trainer._tokenize_prompts([r["prompt"] for r in self.rows])
        return [list(x) for x in ids]

    def step(self) -> dict[str, Any]:
        self._split, self._tokens, self._rewards = {}, {}, []
        side = Side("peer", warm=True)  # every call is one step: the harness does the warm-up
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            self.run_steps(side, 1)
        seconds = side.steps[-1][1]
        rollout = self._split.pop("rollout", 0.0)
        split = {"generation": self._split.get("generation", 0.0), "scoring": self._split.get("scoring", 0.0),
                 "training": seconds - rollout,
                 "other": rollout - self._split.get("generation", 0.0) - self._split.get("scoring", 0.0)}
        reward = float(np.mean(self._rewards)) if self._rewards else float("nan")
        return {"useful": self._tokens.get("generated", 0), "seconds": seconds, "split": split,
                "tokens": dict(self._tokens), "reward": reward}

    def describe(self) -> dict[str, Any]:
        t = self.trainer
        a = t.args
        return {**describe(t.model, lr=a.learning_rate, max_grad_norm=a.max_grad_norm, bf16_autocast=bool(a.bf16)),
                "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                "max_new_tokens": a.max_completion_length, "loss": a.loss_type,
                "clip": [a.epsilon, a.epsilon_high if a.epsilon_high is not None else a.epsilon], "beta": a.beta,
                "iterations": a.num_iterations, "scale_rewards": str(a.scale_rewards),
                "lr_schedule": enum_value(a.lr_scheduler_type),
                "completions_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
                "generations_per_prompt": a.num_generations, "micro_batch": a.per_device_train_batch_size,
                "generation_batch": a.generation_batch_size,
                "gradient_checkpointing": bool(a.gradient_checkpointing) or checkpointing(t.model),
                "stop_ids": sorted(t.eos_token_ids), "generation": self.generation,
                "attn_implementation": t.model.config._attn_implementation, "optim": enum_value(a.optim),
                "torch_compile": bool(a.torch_compile)}


# --- the bench -----------------------------------------------------------------------------------


def seconds_summary(results: list[dict[str, Any]]) -> dict[str, float]:
    """Median, min and max seconds per step over the timed rounds."""
    s = [r["seconds"] for r in results]
    return {"median": round(statistics.median(s), 2), "min": round(min(s), 2), "max": round(max(s), 2),
            "rounds": len(s)}


def medians(results: list[dict[str, Any]], key: str) -> dict[str, float]:
    """The median over rounds of each entry of `result[key]` (a dict of numbers)."""
    names = results[0][key]
    return {k: round(statistics.median(r[key][k] for r in results), 2) for k in names}


def quietly(step: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """`step` with progress bars off (the harness prints one line per round)."""
    def run() -> dict[str, Any]:
        quiet = console.quiet
        set_quiet(True)
        try:
            return step()
        finally:
            set_quiet(quiet)

    return run


DTYPES = ("float32", "bfloat16")


def precision(dtype: str) -> str:
    if dtype == "bfloat16":
        return ("both: bf16 base weights (as the checkpoint is stored), fp32 LoRA adapters, bf16 autocast in "
                "training (TRL's default bf16=True), bf16 generation")
    return "both: fp32 weights, fp32 LoRA adapters, no autocast, fp32 generation"


def run_bench(model: str = "smollm2-135m", rounds: int = 3, threads: int | None = None,
              peer_generation: str | None = None, dtype: str = "float32") -> dict:
    """Warm-up, then `rounds` alternating one-step rounds per side; the one-line summary.

    `peer_generation`: TRL's generation path (None: vLLM colocate when vLLM imports, else
    `PEER_GENERATION`). `dtype`: both sides' precision (`precision`)."""
    if dtype not in DTYPES:
        raise AlignloopError(f"bench grpo: dtype {dtype!r}: one of {', '.join(DTYPES)}")
    return run_against_trl("grpo", threads, lambda load: _run(model, rounds, peer_generation, dtype, load))


def _run(model: str, rounds: int, peer_generation: str | None, dtype: str, load: float) -> dict:
    threads = torch.get_num_threads()
    started = time.perf_counter()
    vllm = vllm_problem()
    generation = peer_generation or ("vllm" if vllm is None else PEER_GENERATION)
    settings = peer_settings(generation, dtype)  # an unknown path fails here, before any model loads
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-grpo-") as tmp:
        say(f"bench grpo: {model}, {PROMPTS} prompts x {GENERATIONS} generations, {MAX_TOKENS} new tokens, "
            f"LoRA r={LORA['r']}, {dtype}; TRL generation: {generation}; warm-up + {rounds} alternating rounds, "
            f"torch threads {threads}")
        ours, peer = Ours(model, dtype), Peer(model, Path(tmp), generation, dtype)
        results = alternate_rounds({"ours": quietly(ours.step), "peer": quietly(peer.step)}, rounds=rounds,
                                   label="bench grpo")
        ours_setup, peer_setup = ours.describe(), peer.describe()
        same_prompts = ours.prompt_ids() == peer.prompt_ids()

    o, p = seconds_summary(results["ours"]), seconds_summary(results["peer"])
    return headline(
        "grpo", o, p, "s/step",
        ratio=round(p["median"] / o["median"], 2),  # s/step: lower is better, so TRL's time over ours
        ours_config="alignloop rl (local): engine rollouts (KV cache, continuous batching, shared-prefix "
                    "prefill), each prompt's group scored in one row with the prompt computed once, vocab "
                    f"projection on completion tokens only, micro batch {ours.cfg.micro_batch}, in-place weight "
                    f"sync, {dtype}",
        peer_config=f"trl {trl_version()} GRPOTrainer: generation {generation}, gradient_checkpointing off, "
                    f"{PROMPTS * GENERATIONS} completions per step ({GENERATIONS} per prompt) trained "
                    f"{MICRO_BATCH} per forward, fused LM head, no per-step logging, {dtype}",
        machine=machine_facts(threads, peers=("trl", "transformers", "peft", "accelerate")),
        dtype=dtype, precision=precision(dtype), model=model,
        split_s={"ours": medians(results["ours"], "split"), "peer": medians(results["peer"], "split")},
        tokens_per_step={"ours": medians(results["ours"], "tokens"), "peer": medians(results["peer"], "tokens")},
        mean_reward={"ours": round(float(np.mean([r["reward"] for r in results["ours"]])), 3),
                     "peer": round(float(np.mean([r["reward"] for r in results["peer"]])), 3)},
        ours_skipped_sequences=max(r["skipped"] for r in results["ours"]),
        same_prompt_ids=same_prompts,
        peer_vllm=vllm or ("used (colocate)" if generation == "vllm" else f"imports; not used ({generation} asked)"),
        peer_settings=settings, ours_setup=ours_setup, peer_setup=peer_setup,
        load_at_start=round(load, 2), load_at_end=round(load_average(), 2),
        seconds=round(time.perf_counter() - started, 1))
