"""`run_rl`: the RL stage (`alignloop rl grpo|ppo RECIPE`), in one process or as Ray actors.

Each step: sample tasks (a pure function of the seed and the step number), play them `group`
times with the current policy (Inference), score (Environment), update (Trainer), hand the
weights back to Inference, in place. Output in runs/<run>/rl-<algorithm>/: metrics.jsonl (one
line per step: reward, env metrics, loss terms, mismatch, time split), samples.jsonl (a few
episodes per step), eval.jsonl (greedy accuracy on held-out tasks, verifiable envs), checkpoints/,
model/ (the final policy, LoRA merged), manifest.json.

In order: open the stage (up to date: skipped), build the roles once (`backend.start_roles`),
resume, the step loop (`train_steps`), then `finish` (final eval, reward-hacking verdict, model,
manifest). A killed run started again resumes from its newest checkpoint: weights, optimizer,
scheduler, RNGs and the safety multiplier come back, and since each step's tasks and sampling
seeds derive from the step number, a synchronous run continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from typing import Any

from alignloop.errors import AlignloopError
from alignloop.rl.async_rollouts import AsyncRollouts
from alignloop.rl.backend import Roles, start_roles
from alignloop.rl.config import RLRecipe, RLSection
from alignloop.rl.env import Environment
from alignloop.rl.evaluation import ACCURACY, EVAL, eval_before, eval_during, eval_final
from alignloop.rl.hacking import GroundTruthFn, HackingWatch, report_verdict
from alignloop.rl.rollout import Rollout, play
from alignloop.runs import METRICS, Stage, append_jsonl, atomic_write_json
from alignloop.train import checkpoint as ckpt
from alignloop.train import session
from alignloop.train.metrics import require_finite
from alignloop.ui import progress, say

SAMPLES = "samples.jsonl"
HACKING = "reward_hacking.json"


def run_rl(recipe: RLRecipe, run: str | None = None, force: bool = False,
           groundtruth: GroundTruthFn | None = None, *, prompts: list[list[dict]] | None = None,
           env: Environment | None = None, backend: str = "local", engine_dtype: str = "float32") -> Stage:
    """Train `recipe`'s policy against its environment; the finished stage.

    `groundtruth` (evaluation only, handed in from outside rl/): (contexts, responses, tasks) ->
    the true engagement of each reply; logged per step next to the learned reward and judged at
    the end (reward_hacking.json), never trained on. `prompts`: held-out users' first messages
    that replace a reward_model env's own prompts (they come with its ground truth). `env`: play
    this environment instead of building the recipe's. `backend`: "local" or "ray".
    """
    cfg = recipe.rl
    stage, done = session.open_stage(recipe, f"rl-{cfg.algorithm}", run, force, inputs=recipe.env.inputs())
    if done:
        return stage
    watch = HackingWatch(groundtruth) if groundtruth is not None else None
    env = env if env is not None else recipe.env.build(prompts)
    with start_roles(backend, recipe, env, engine_dtype) as roles:
        start = resume(stage, roles, cfg.steps)
        if watch is not None and start:
            watch.reload(stage.path(METRICS))
        if start == 0:
            eval_before(stage, roles, recipe)
        last = train_steps(stage, recipe, roles, start, watch)
        finish(stage, recipe, roles, start, watch, last)
    say(f"[green]{stage.name}: {cfg.steps} steps[/] -> {stage.dir}")
    return stage


def resume(stage: Stage, roles: Roles, steps: int) -> int:
    """Continue from the newest checkpoint of this config, if any: the trainer's state, the safety
    price it had, the engine's weights. The step it was made at (0: afresh)."""
    state = session.resume(stage, roles.trainer.load_checkpoint, steps, label=stage.name,
                           logs=(METRICS, SAMPLES, EVAL))
    start = int(state["step"])
    if start:
        if roles.dual is not None and "safety_lambda" in state:
            roles.dual.set(state["safety_lambda"])
        roles.inference.offer(roles.trainer.weights(), version=start)
    return start


def train_steps(stage: Stage, recipe: RLRecipe, roles: Roles, start: int, watch: HackingWatch | None
                ) -> dict[str, Any]:
    """Steps start+1 .. rl.steps: rollout, update, log, checkpoint, eval. The last step's metrics.

    Async mode: a producer thread plays the next steps' rollouts while this one trains (at most
    `max_staleness` updates behind); in-run evals are then skipped (they would race it).
    """
    cfg = recipe.rl
    make = partial(step_rollout, recipe, roles)
    producer = (AsyncRollouts(make, start, cfg.steps, cfg.max_staleness)
                if cfg.mode == "async" and start < cfg.steps else None)
    last: dict[str, Any] = {}
    try:
        with progress() as bar:
            task = bar.add_task(stage.name, total=cfg.steps, completed=start, info="")
            for step in range(start + 1, cfg.steps + 1):
                began = time.perf_counter()
                with _stops_cleanly(step, stage):
                    rollout = (producer.get if producer else make)(step)
                    waited = time.perf_counter() - began if producer else 0.0
                    metrics = _update(roles, watch, producer, rollout, step)
                    metrics.update(_timings(rollout, roles, metrics.pop("train_seconds"), waited, began))
                    require_finite(metrics)
                stage.log_metrics(step=step, **metrics)
                _log_samples(stage, rollout, step, cfg.samples_per_step)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    _save(stage, roles, cfg, step)
                if producer is None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    metrics.update(eval_during(stage, roles, recipe, step))
                last = metrics
                info = f"reward {metrics['reward']:.3f} · {metrics['step_s']:.1f} s/step"
                bar.update(task, completed=step, info=info)
    finally:
        if producer is not None:
            producer.close()
    return last


def step_rollout(recipe: RLRecipe, roles: Roles, step: int) -> Rollout:
    """Step `step`'s episodes: its tasks and sampling seeds derive from the seed and the step alone."""
    cfg = recipe.rl
    tasks = roles.env.sample_tasks(cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step)
    return play(roles.env, roles.inference, roles.tokenizer, tasks, cfg.group, recipe.sampling.params(),
                seed=cfg.seed * 7919 + step, max_turns=recipe.env.max_turns, max_context=cfg.max_context)


def finish(stage: Stage, recipe: RLRecipe, roles: Roles, start: int, watch: HackingWatch | None,
           last: dict[str, Any]) -> None:
    """Final eval, the reward-hacking verdict, the policy (LoRA merged) and the manifest."""
    final, change = eval_final(stage, roles, recipe)
    verdict = watch.verdict() if watch is not None else None
    if verdict is not None:
        atomic_write_json(stage.path(HACKING), verdict)
        report_verdict(stage.name, verdict)
    outputs = roles.trainer.save_policy(roles.tokenizer, stage.path("model"))
    outputs += [stage.path(n) for n in (METRICS, SAMPLES, EVAL, HACKING, ACCURACY) if stage.path(n).exists()]
    stage.finish(outputs, extra={"steps": recipe.rl.steps, "resumed_from": start, "final_eval": final,
                                 "accuracy_change": asdict(change) if change is not None else None,
                                 "reward_hacking": verdict,
                                 "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}})


@contextlib.contextmanager
def _stops_cleanly(step: int, stage: Stage) -> Iterator[None]:
    """A broken environment or reward, or a non-finite step, stops the run in one line naming the
    step and the checkpoint it can resume from; nothing of the step is logged or saved."""
    try:
        yield
    except AlignloopError as e:
        raise AlignloopError(f"step {step}: {e}; {ckpt.what_is_intact(stage.path('checkpoints'))}") from None


def _update(roles: Roles, watch: HackingWatch | None, producer: AsyncRollouts | None, rollout: Rollout,
            step: int) -> dict[str, Any]:
    """Score the rollout (safety price, ground truth), train on it, offer Inference the new weights."""
    metrics = {**rollout.metrics(), "staleness": (step - 1) - rollout.version}
    if roles.dual is not None:
        metrics.update(roles.dual.update())
    if watch is not None:
        metrics.update(watch.score(step, rollout.trajectories))
    metrics.update(roles.trainer.step(rollout.trajectories))
    roles.inference.offer(roles.trainer.weights(), version=step)
    if producer is None:
        roles.inference.apply_pending()  # sync: in place now, timed as the weight sync
    else:
        producer.trained(step)
    return metrics


def _timings(rollout: Rollout, roles: Roles, training: float, waited: float, began: float) -> dict[str, float]:
    """Where the step's time went (wait_s: async, for the producer's rollout)."""
    return {"generation_s": rollout.seconds["generation"], "scoring_s": rollout.seconds["environment"],
            "training_s": training, "sync_s": roles.inference.sync_seconds,
            "wait_s": waited, "step_s": time.perf_counter() - began}


def _log_samples(stage: Stage, rollout: Rollout, step: int, n: int) -> None:
    for t in rollout.trajectories[:n]:
        append_jsonl(stage.path(SAMPLES), {"step": step, "reward": t.reward, "messages": t.messages,
                                           "info": t.info, "truncated": t.truncated})


def _save(stage: Stage, roles: Roles, cfg: RLSection, step: int) -> None:
    """A checkpoint: the trainer's state plus this config's hash and the safety price it had."""
    extra = {"config_hash": stage.work_hash(), "total_steps": cfg.steps,
             **({"safety_lambda": roles.dual.value} if roles.dual is not None else {})}
    roles.trainer.save_checkpoint(stage.path("checkpoints"), step, extra, cfg.keep_checkpoints)
