"""`alignloop rl grpo|ppo RECIPE`: the RL loop, local backend (one process, a thread for async).

Each step: sample tasks (a pure function of the seed and the step number), play them `group`
times with the current policy (Inference), score (Environment), update (Trainer), hand the
weights back to Inference in place. Output in runs/<run>/rl-<algorithm>/: metrics.jsonl (one
line per step: reward, env metrics, loss terms, mismatch, time split), samples.jsonl (a few
episodes per step), eval.jsonl (greedy accuracy on held-out tasks, verifiable envs), checkpoints/,
model/ (the final policy, LoRA merged), manifest.json.

A killed run started again resumes from its newest checkpoint: weights, optimizer, scheduler and
RNGs come back, and since each step's tasks and sampling seeds derive from the step number, a
synchronous run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.engine.api import SamplingParams
from alignloop.errors import AlignloopError
from alignloop.recipes import recipe_to_dict
from alignloop.rl.config import RLRecipe
from alignloop.rl.env import Environment
from alignloop.rl.hacking import GroundTruthFn, HackingWatch, report_verdict
from alignloop.rl.inference import Inference
from alignloop.rl.rollout import Rollout, play
from alignloop.rl.safety import attach as attach_dual
from alignloop.rl.trainer import TrainerRole
from alignloop.runs import Stage, atomic_write_text, config_hash, default_run_name, trim_jsonl
from alignloop.train import checkpoint as ckpt
from alignloop.ui import progress, say

SAMPLES = "samples.jsonl"
EVAL = "eval.jsonl"
HACKING = "reward_hacking.json"
ACCURACY = "accuracy_change.json"  # verifiable envs: before vs after, paired
EVAL_SEED = 10_000_019  # held-out tasks: a seed no training step uses


def build_env(recipe: RLRecipe, prompts: list[list[dict]] | None = None) -> Environment:
    """The recipe's environment; `prompts` (e.g. held-out simulated users' first messages, given by
    the caller) replace env.prompts for the reward-model environment."""
    e = recipe.env
    if e.kind == "arithmetic":
        from alignloop.rl.arithmetic import ArithmeticEnv

        return ArithmeticEnv(e.max_operand, e.correct_reward, e.format_reward, e.system, e.answer_from)
    from alignloop.rl.reward_env import RewardModelEnv, load_reward, read_prompts

    if e.kind == "reward_model":
        return RewardModelEnv(load_reward(e.reward), prompts if prompts is not None else read_prompts(e.prompts),
                              system=e.system)
    if e.kind == "user_sim":
        from alignloop.rl.user_env import UserSimEnv, sim_users

        return UserSimEnv(load_reward(e.reward), sim_users(e.users_seed, e.users), n_users=e.users,
                          max_turns=e.max_turns, stay_component=e.stay_component, system=e.system)
    from alignloop.rl.tool_env import calculator_env

    return calculator_env(e.max_operand, family=e.tool_family, max_calls=e.max_tool_calls)


def step_tasks(env: Environment, recipe: RLRecipe, step: int) -> list[Any]:
    return env.sample_tasks(recipe.rl.prompts_per_step, seed=recipe.rl.seed * 1_000_003 + step)


def sampling_params(recipe: RLRecipe) -> SamplingParams:
    s = recipe.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    ts = rollout.trajectories
    rewards = np.array([t.reward for t in ts])
    out = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
           "response_tokens": float(np.mean([t.n_policy for t in ts])),
           "truncated": float(np.mean([t.truncated for t in ts])), "policy_version": rollout.version}
    out.update(rollout.info)
    return out


def evaluate(env: Environment, inference: Inference, tokenizer: Any, recipe: RLRecipe
             ) -> tuple[dict[str, float], list[float] | None]:
    """Greedy answers to the held-out tasks: the env's metrics (e.g. correct, formatted) averaged,
    and each task's correctness (for the paired before/after test; None if the env has none)."""
    n = recipe.env.eval_tasks
    if n == 0 or env.name != "arithmetic":
        return {}, None
    tasks = env.sample_tasks(n, seed=EVAL_SEED)
    greedy = SamplingParams(temperature=0.0, max_tokens=recipe.sampling.max_tokens)
    r = play(env, inference, tokenizer, tasks, 1, greedy, seed=EVAL_SEED, max_context=recipe.rl.max_context)
    metrics = {"eval_reward": float(np.mean([t.reward for t in r.trajectories])),
               **{f"eval_{k}": v for k, v in r.info.items()}}
    per_task = ([float(t.info["correct"]) for t in r.trajectories]
                if all("correct" in t.info for t in r.trajectories) else None)
    return metrics, per_task


def _eval_record(step: int, metrics: dict[str, float], per_task: list[float] | None) -> dict[str, Any]:
    return {"step": step, **metrics, **({"per_task_correct": per_task} if per_task is not None else {})}


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_rl(recipe: RLRecipe, run: str | None = None, force: bool = False, env: Environment | None = None,
           engine_dtype: str = "float32", groundtruth: GroundTruthFn | None = None, backend: str = "local") -> Stage:
    """`groundtruth` (evaluation only, passed in from outside rl/): (contexts, responses) -> the true
    engagement of each reply; logged per step next to the learned reward, never trained on."""
    from alignloop.engine.engine import Engine
    from alignloop.models import load_model, load_tokenizer

    cfg = recipe.rl
    stage_name = f"rl-{cfg.algorithm}"
    inputs = [recipe.env.prompts] if recipe.env.prompts else []
    stage = Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), stage_name,
                  recipe_to_dict(recipe), inputs=inputs)
    if not force and stage.is_complete():
        say(f"[green]{stage_name}: up to date[/] ({stage.dir}), skipped")
        return stage
    stage.start()
    env = env if env is not None else build_env(recipe)
    watch = HackingWatch(groundtruth) if groundtruth is not None else None

    dtype = "float32" if recipe.model.dtype == "auto" else recipe.model.dtype
    if backend == "ray":  # the trainer and inference actors load the weights; the driver needs the tokenizer
        model, tokenizer = None, load_tokenizer(recipe.model.name, for_batching=True)
    else:
        model, tokenizer = load_model(recipe.model.name, dtype=dtype, seed=recipe.model.seed)
    max_batch = max(cfg.prompts_per_step * cfg.group, 1)
    trainer_args = (cfg, recipe.sampling.temperature, tokenizer.pad_token_id or 0,
                    recipe.sampling.max_tokens * recipe.env.max_turns)
    if backend == "ray":
        from alignloop.rl import ray_backend

        env, inference = ray_backend.start(env, recipe.model.name, recipe.model.seed, dtype, engine_dtype, max_batch)
        trainer = ray_backend.start_trainer(recipe.model.name, recipe.model.seed, dtype, *trainer_args)
        dual = env.dual
    else:
        # The engine copies the weights into its own fused buffers: build it before adapters exist.
        inference = Inference(Engine(model, tokenizer, dtype=engine_dtype, max_batch=max_batch, show_progress=False))
        trainer = TrainerRole(model, *trainer_args, seed=cfg.seed)
        dual = attach_dual(env)  # safety: the reward's Lagrangian multiplier moves once per step

    root = stage.path("checkpoints")
    fingerprint = config_hash(stage.config)
    start = 0
    latest = ckpt.latest_checkpoint(root)
    if latest is not None and ckpt.read_trainer_state(latest).get("config_hash") != fingerprint:
        say(f"[yellow]checkpoints in {root} belong to another config: starting afresh[/]")
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        latest = None
    if latest is not None:
        start = trainer.load_checkpoint(latest)
        if dual is not None and "safety_lambda" in (state := ckpt.read_trainer_state(latest)):
            dual.set(state["safety_lambda"])
        inference.offer(trainer.weights(), version=start)
        say(f"{stage_name}: resuming from {latest.name} ({start}/{cfg.steps} steps done)")
    for name in ("metrics.jsonl", SAMPLES, EVAL):
        trim_jsonl(stage.path(name), start if start else -1)  # afresh: even a stale step-0 eval goes
    if watch is not None and start:
        watch.reload(stage.path("metrics.jsonl"))

    if start == 0 and (first := evaluate(env, inference, tokenizer, recipe))[0]:
        _append(stage.path(EVAL), _eval_record(0, *first))
        say(f"{stage_name}: before training " + _fmt(first[0]))

    params = sampling_params(recipe)

    def make_rollout(step: int) -> Rollout:
        return play(env, inference, tokenizer, step_tasks(env, recipe, step), cfg.group, params,
                    seed=cfg.seed * 7919 + step, max_turns=recipe.env.max_turns, max_context=cfg.max_context)

    producer = None
    if cfg.mode == "async" and start < cfg.steps:
        from alignloop.rl.async_rollouts import AsyncRollouts

        producer = AsyncRollouts(make_rollout, start, cfg.steps, cfg.max_staleness)
    last: dict[str, Any] = {}
    try:
        with progress() as bar:
            task = bar.add_task(stage_name, total=cfg.steps, completed=start, info="")
            for step in range(start + 1, cfg.steps + 1):
                began = time.perf_counter()
                try:
                    rollout = producer.get(step) if producer else make_rollout(step)
                except AlignloopError as e:
                    kept = ckpt.latest_checkpoint(root)
                    raise AlignloopError(f"step {step}: {e}; the last checkpoint "
                                         f"{'(' + str(kept) + ') ' if kept else ''}is intact") from None
                waited = time.perf_counter() - began
                metrics = rollout_metrics(rollout)
                metrics["staleness"] = (step - 1) - rollout.version
                if dual is not None:
                    metrics.update(dual.update())
                if watch is not None:
                    metrics.update(watch.score(step, rollout.trajectories))
                metrics.update(trainer.step(rollout.trajectories))
                inference.offer(trainer.weights(), version=step)
                if producer is None:
                    inference.apply_pending()  # sync: in place now, timed as the weight sync
                else:
                    producer.trained(step)
                metrics.update({"generation_s": rollout.seconds["generation"],
                                "scoring_s": rollout.seconds["environment"],
                                "training_s": metrics.pop("train_seconds"), "sync_s": inference.sync_seconds,
                                "wait_s": waited if producer else 0.0, "step_s": time.perf_counter() - began})
                stage.log_metrics(step=step, **metrics)
                for t in rollout.trajectories[: cfg.samples_per_step]:
                    _append(stage.path(SAMPLES), {"step": step, "reward": t.reward, "messages": t.messages,
                                                  "info": t.info, "truncated": t.truncated})
                if step % cfg.save_every == 0 or step == cfg.steps:
                    trainer.save_checkpoint(root, step, {"config_hash": fingerprint, "total_steps": cfg.steps,
                                                         **({"safety_lambda": dual.value} if dual is not None else {})},
                                            cfg.keep_checkpoints)
                if (producer is None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps
                        and (ev := evaluate(env, inference, tokenizer, recipe))[0]):
                    _append(stage.path(EVAL), _eval_record(step, *ev))
                    metrics.update(ev[0])
                last = metrics
                bar.update(task, completed=step, info=f"reward {metrics['reward']:.3f} · {metrics['step_s']:.1f} s/step")
    finally:
        if producer is not None:
            producer.close()

    final, per_task = evaluate(env, inference, tokenizer, recipe)
    change = None
    if final:
        trim_jsonl(stage.path(EVAL), cfg.steps - 1)  # resumed at the last step: its final eval is redone
        before = _before(stage.path(EVAL))
        _append(stage.path(EVAL), _eval_record(cfg.steps, final, per_task))
        say(f"{stage_name}: after {cfg.steps} steps " + _fmt(final))
        if before is not None and per_task is not None:
            from alignloop.rl.arithmetic import accuracy_change

            change = accuracy_change(before, per_task)
            say(f"{stage_name}: " + change.line())
            atomic_write_text(stage.path(ACCURACY), json.dumps(asdict(change), indent=2) + "\n")
    verdict = watch.verdict() if watch is not None else None
    if verdict is not None:
        atomic_write_text(stage.path(HACKING), json.dumps(verdict, indent=2) + "\n")
        report_verdict(stage_name, verdict)
    outputs = trainer.save_policy(tokenizer, stage.path("model"))
    outputs += [stage.path(n) for n in ("metrics.jsonl", SAMPLES, EVAL, HACKING, ACCURACY) if stage.path(n).exists()]
    stage.finish(outputs, extra={"steps": cfg.steps, "resumed_from": start, "final_eval": final,
                                 "accuracy_change": asdict(change) if change is not None else None,
                                 "reward_hacking": verdict,
                                 "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}})
    if backend == "ray":
        ray_backend.stop(env, inference, trainer)
    say(f"[green]{stage_name}: {cfg.steps} steps[/] -> {stage.dir}")
    return stage


def _fmt(ev: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.3f}" for k, v in ev.items())


def _before(path: Path) -> list[float] | None:
    """Per-task correctness before training (the latest step-0 eval; it may predate a resume)."""
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    first = next((r for r in reversed(records) if r.get("step") == 0), None)
    return None if first is None else first.get("per_task_correct")
