"""`alignloop bench grpo`: one GRPO step, our local RL loop vs TRL's `GRPOTrainer`.

Work, the same on both sides: SmolLM2-135M with LoRA (r 16, alpha 32, no dropout, all linear
layers), 8 fixed arithmetic prompts x 8 generations, up to 64 new tokens (temperature 1, no
top-p/top-k), one optimizer step per batch of 64 completions, fp32 weights and no autocast on
both sides (on CPUs without AMX bf16 matmuls are not faster). The objective is TRL's default:
group-normalised advantages, token-level (DAPO) aggregation, clip 0.2 both ways, no KL term
(beta 0, so no reference model), one iteration per batch. The reward, a Python function both
sides call on the decoded replies, is the arithmetic task's exact-answer + format reward plus a
small length term (continuous, so groups have spread: with all-equal rewards in a group our
trainer skips those sequences exactly, which would flatter us).

Metric: seconds per step, i.e. generation + reward + forward/backward + optimizer step (+ our
weight sync into the engine). TRL is timed between its `on_step_begin` and `on_step_end`
callbacks, which bracket its generation too; model loading is not timed; the first step of each
side is a warm-up. The sides alternate, one step at a time, who goes first alternating too, so
load from other work on the machine hits both alike. TRL keeps its other defaults (gradient
checkpointing, transformers `generate` with padding, entropy metrics); those are the point.

The JSON line carries our time split (generation / scoring / training / sync), each side's
parity facts, and the machine load.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignloop.bench.training import (
    LORA,
    Side,
    TrlPeer,
    describe,
    load_average,
    run_against_trl,
    trl_version,
)
from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.models import load_model
from alignloop.rl.arithmetic import ArithmeticEnv, score
from alignloop.rl.config import RLSection
from alignloop.rl.inference import Inference
from alignloop.rl.rollout import play
from alignloop.rl.trainer import Trainer
from alignloop.rl.weights import policy_weights
from alignloop.train.config import LoraSection
from alignloop.train.lora import add_lora
from alignloop.ui import console, say, set_quiet

PROMPTS = 8
GENERATIONS = 8
MAX_TOKENS = 64
LR = 1e-5
SEED = 0


def bench_problems(n: int = PROMPTS):
    return ArithmeticEnv().sample_tasks(n, seed=SEED)


def bench_reward(text: str, answer: int) -> float:
    reward, _, _ = score(text, answer)
    return reward + 0.2 * min(len(text), 200) / 200


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


def rl_section() -> RLSection:
    return RLSection(algorithm="dapo", prompts_per_step=PROMPTS, group=GENERATIONS, steps=1_000_000, lr=LR,
                     clip_low=0.2, clip_high=0.2, lora=LoraSection(**LORA), bf16=False, micro_batch=16,
                     tis_cap=2.0, schedule="constant", seed=SEED)


class Ours:
    def __init__(self, model_name: str) -> None:
        self.cfg = rl_section()
        model, self.tokenizer = load_model(model_name, dtype="float32")
        self.inference = Inference(Engine(model, self.tokenizer, dtype="float32", max_batch=PROMPTS * GENERATIONS,
                                          show_progress=False))
        torch.manual_seed(SEED)
        self.model = add_lora(model, self.cfg.lora)
        self.trainer = Trainer(self.model, self.cfg, 1.0, self.tokenizer.pad_token_id or 0, MAX_TOKENS)
        self.env = _BenchEnv()
        self.params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
        self.n = 0

    def step(self) -> dict[str, float]:
        self.n += 1
        began = time.perf_counter()
        rollout = play(self.env, self.inference, self.tokenizer, bench_problems(), GENERATIONS, self.params,
                       seed=SEED + self.n)
        train = self.trainer.step(rollout.trajectories)
        self.inference.offer(policy_weights(self.model), version=self.n)
        self.inference.apply_pending()
        return {"seconds": time.perf_counter() - began, "generation": rollout.seconds["generation"],
                "scoring": rollout.seconds["environment"], "training": train["train_seconds"],
                "sync": self.inference.sync_seconds,
                "completion_tokens": float(sum(t.n_policy for t in rollout.trajectories)),
                "skipped": float(train["skipped_sequences"]),
                "reward": float(np.mean([t.reward for t in rollout.trajectories]))}

    def describe(self) -> dict[str, Any]:
        return {**describe(self.model, lr=self.cfg.lr, max_grad_norm=self.cfg.max_grad_norm, bf16_autocast=False),
                "completions_per_step": PROMPTS * GENERATIONS, "max_new_tokens": MAX_TOKENS,
                "loss": "token-mean (dapo)", "clip": [self.cfg.clip_low, self.cfg.high], "beta": self.cfg.beta}


def peer_config(output_dir: str | Path):
    from trl import GRPOConfig  # optional extra, checked by require_trl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, learning_rate=LR,
                          per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                          gradient_accumulation_steps=1, max_completion_length=MAX_TOKENS, temperature=1.0,
                          top_p=1.0, beta=0.0, max_steps=1, save_strategy="no", report_to="none", logging_steps=1,
                          disable_tqdm=True,
                          seed=SEED)


def peer_reward(completions, answer, **kwargs) -> list[float]:
    """`bench_reward` as TRL calls a reward function: a batch of completions and their answers."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [bench_reward(t, a) for t, a in zip(texts, answer)]


class Peer(TrlPeer):
    """TRL's GRPOTrainer with its defaults (see the module docstring), one step per call."""

    def __init__(self, model_name: str, workdir: Path) -> None:
        from trl import GRPOTrainer  # optional extra, checked by require_trl

        env = ArithmeticEnv()
        rows = [{"prompt": env.messages(p), "answer": p.answer} for p in bench_problems()]
        super().__init__(GRPOTrainer, model_name, lambda: peer_config(workdir / "trl"), rows, SEED,
                         dtype="float32", count_tokens=False, reward_funcs=peer_reward)

    def step(self) -> dict[str, float]:
        side = Side("peer", warm=True)  # every step counts: the bench keeps its own warm-up round
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            self.run(side, 0.0)  # a budget of 0 s: one step
        logs = [h for h in self.trainer.state.log_history if "reward" in h]
        return {"seconds": side.steps[-1][1], "reward": float(logs[-1]["reward"]) if logs else float("nan"),
                "completion_tokens": float(logs[-1].get("completions/mean_length", 0)) * PROMPTS * GENERATIONS
                if logs else 0.0}

    def describe(self) -> dict[str, Any]:
        a = self.trainer.args
        return {**describe(self.trainer.model, lr=a.learning_rate, max_grad_norm=a.max_grad_norm,
                            bf16_autocast=bool(a.bf16)),
                "completions_per_step": a.per_device_train_batch_size * a.gradient_accumulation_steps,
                "max_new_tokens": a.max_completion_length, "loss": f"{a.loss_type}", "clip": [a.epsilon,
                a.epsilon_high if a.epsilon_high is not None else a.epsilon], "beta": a.beta,
                "gradient_checkpointing": bool(a.gradient_checkpointing), "use_vllm": bool(a.use_vllm)}


def run_bench(model: str = "smollm2-135m", rounds: int = 3, threads: int | None = None) -> dict:
    """Time one GRPO step of ours and of TRL in alternating rounds; return the one-line summary."""
    return run_against_trl("grpo", threads, lambda load: _run(model, rounds, load))


def _alternate(ours: Ours, peer: Peer, rounds: int) -> dict[str, list[dict[str, float]]]:
    """A warm-up step of each side, then `rounds` rounds of one step each, who goes first alternating."""
    timed: dict[str, list[dict[str, float]]] = {"ours": [], "peer": []}
    quiet = console.quiet
    for r in range(rounds + 1):
        order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
        for name in order:
            set_quiet(True)
            try:
                result = ours.step() if name == "ours" else peer.step()
            finally:
                set_quiet(quiet)
            say(f"{'warm-up' if r == 0 else f'round {r}/{rounds}'} {name}: {result['seconds']:.1f} s/step")
            if r > 0:
                timed[name].append(result)
    return timed


def _run(model: str, rounds: int, load: float) -> dict:
    threads = torch.get_num_threads()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-grpo-") as tmp:
        say(f"bench grpo: {model}, {PROMPTS} prompts x {GENERATIONS} generations, {MAX_TOKENS} new tokens, "
            f"LoRA r={LORA['r']}, fp32; warm-up + {rounds} alternating rounds, torch threads {threads}")
        ours, peer = Ours(model), Peer(model, Path(tmp))
        timed = _alternate(ours, peer, rounds)
        ours_setup, peer_setup = ours.describe(), peer.describe()

    def mean(name: str, key: str) -> float:
        return float(np.mean([x[key] for x in timed[name]]))

    ours_s, peer_s = mean("ours", "seconds"), mean("peer", "seconds")
    line = {"bench": "grpo", "ours": round(ours_s, 2), "peer": round(peer_s, 2), "unit": "s/step",
            "ratio": round(peer_s / max(ours_s, 1e-9), 2),
            "ours_split_s": {k: round(mean("ours", k), 2) for k in ("generation", "scoring", "training", "sync")},
            "completion_tokens_per_step": {"ours": round(mean("ours", "completion_tokens")),
                                           "peer": round(mean("peer", "completion_tokens"))},
            "mean_reward": {"ours": round(mean("ours", "reward"), 3), "peer": round(mean("peer", "reward"), 3)},
            "ours_skipped_sequences": round(mean("ours", "skipped"), 1),
            "precision": "both: fp32 weights, fp32 LoRA adapters, no autocast",
            "ours_config": "engine (KV cache, continuous batching, shared-prefix prefill) for rollouts, "
                           "each prompt's group scored in one row with the prompt computed once, "
                           "vocab projection on completion tokens only, in-place weight sync, micro batch 16",
            "peer_config": f"trl {trl_version()} GRPOTrainer defaults (transformers generate, gradient checkpointing)"
                           f", batch {PROMPTS * GENERATIONS}, num_generations {GENERATIONS}",
            "model": model, "timed_steps": len(timed["ours"]), "ours_setup": ours_setup, "peer_setup": peer_setup,
            "torch_threads": threads, "load_at_start": round(load, 2), "load_at_end": round(load_average(), 2),
            "seconds": round(time.perf_counter() - started, 1)}
    return line
