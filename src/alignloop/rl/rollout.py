"""Play a batch of episodes: Environment poses, Inference answers, until every episode is done.

Every task is played `group` times (GRPO's group). Episodes are built token-in, token-out: the
first prompt is the rendered chat; each reply is appended as the engine's exact ids (with its
end-of-turn token) and log-probs; what the environment says next (a user turn, a tool result) is
appended as the template's rendering of just the new messages. Re-rendering the whole conversation
instead would re-tokenize the policy's text, which need not give back the ids it sampled, and the
trainer would then score tokens the policy never produced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from alignloop.engine.api import SamplingParams
from alignloop.errors import AlignloopError
from alignloop.rl.env import Environment
from alignloop.rl.inference import Inference
from alignloop.rl.trajectory import Trajectory


@dataclass
class Rollout:
    trajectories: list[Trajectory]
    version: int                # the policy version (trainer steps) the episodes were sampled from
    seconds: dict[str, float] = field(default_factory=dict)  # generation / environment
    info: dict[str, float] = field(default_factory=dict)     # env metrics, batch means

    def metrics(self) -> dict[str, float]:
        """The batch's reward (mean, spread), reply length, truncation, policy version, env metrics."""
        rewards = np.array([t.reward for t in self.trajectories])
        out = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "response_tokens": float(np.mean([t.n_policy for t in self.trajectories])),
               "truncated": float(np.mean([t.truncated for t in self.trajectories])), "policy_version": self.version}
        out.update(self.info)
        return out


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def turn_delta(tokenizer: Any, before: list[dict], reply: str, after: list[dict], stopped_on_token: bool) -> str:
    """The text the template puts between the end of the policy's reply and the next generation.

    `before` is the conversation the reply answered, `after` the environment's next observation
    (which starts with `before` + the reply). When generation stopped on the end-of-turn token, that
    token is already in the trajectory and is not repeated.
    """
    closed = render(tokenizer, before + [{"role": "assistant", "content": reply}], False)
    full = render(tokenizer, after, True)
    if not full.startswith(closed):
        raise AlignloopError("the chat template does not extend a conversation by appending to it "
                             "(re-renders earlier turns): multi-turn RL needs one that does")
    at = closed.rfind(reply) if reply else len(render(tokenizer, before, True))
    if at < 0:
        raise AlignloopError("the chat template changes the reply's text (e.g. strips it); cannot align tokens")
    after_reply = closed[at + len(reply):]
    eos = tokenizer.eos_token or ""
    if stopped_on_token and eos and after_reply.startswith(eos):
        after_reply = after_reply[len(eos):]
    elif stopped_on_token:
        # Stopped on another stop token (e.g. <|eot_id|>): drop the template's first special token.
        after_reply = after_reply.lstrip()
        for special in tokenizer.all_special_tokens:
            if special and after_reply.startswith(special):
                after_reply = after_reply[len(special):]
                break
    return after_reply + full[len(closed):]


def episode_seed(seed: int, episode: int, turn: int) -> int:
    return (seed * 1_000_003 + episode * 1009 + turn) % (2**62)


def play(env: Environment, inference: Inference, tokenizer: Any, tasks: list[Any], group: int,
         sampling: SamplingParams, seed: int, max_turns: int = 1, max_context: int = 2048) -> Rollout:
    """Play len(tasks) x group episodes to the end; rewards summed over each episode's steps.

    An environment's per-step info (p_continue, unsafe, a reward head's output) describes one reply,
    so an episode's info is its mean over the replies it played, not the sum: a probability stays one.
    """
    episodes = [task for task in tasks for _ in range(group)]
    n = len(episodes)
    began = time.perf_counter()
    gen_s = 0.0
    version = inference.version
    observations = env.reset(episodes)
    if len(observations) != n:
        raise AlignloopError(f"environment {env.name}: reset returned {len(observations)} observations for {n} episodes")
    trajectories = []
    for i, obs in enumerate(observations):
        ids = encode(tokenizer, render(tokenizer, obs, True))
        trajectories.append(Trajectory(ids, [False] * len(ids), [0.0] * len(ids), group=i // group,
                                       messages=list(obs), task=episodes[i]))
    done = np.zeros(n, dtype=bool)
    info: list[dict[str, float]] = [{} for _ in range(n)]
    steps_with: list[dict[str, int]] = [{} for _ in range(n)]
    for turn in range(max_turns):
        live = [i for i in range(n) if not done[i]]
        if not live:
            break
        room = [max_context - len(trajectories[i].tokens) for i in live]
        params = [replace(sampling, seed=episode_seed(seed, i, turn), max_tokens=max(1, min(sampling.max_tokens, r)))
                  for i, r in zip(live, room)]
        t0 = time.perf_counter()
        completions = inference.generate([trajectories[i].tokens for i in live], params)
        version = inference.version
        gen_s += time.perf_counter() - t0
        actions: list[str | None] = [None] * n
        for i, c in zip(live, completions):
            t = trajectories[i]
            t.append(c.token_ids, True, c.logprobs)
            t.truncated = c.finish_reason == "length"
            t.info["_stopped_on_token"] = isinstance(c.stop_reason, int)
            if c.routing is not None:  # MoE: this call re-read the whole episode, so its routing covers it
                t.routing = c.routing
            actions[i] = c.text
        step = env.step(actions)
        if len(step.rewards) != n or len(step.done) != n:
            raise AlignloopError(f"environment {env.name}: step returned {len(step.rewards)} rewards for {n} episodes")
        for i in live:
            t = trajectories[i]
            t.reward += float(step.rewards[i])
            t.messages = t.messages + [{"role": "assistant", "content": actions[i]}]
            if step.info:
                for k, v in step.info[i].items():
                    info[i][k] = info[i].get(k, 0.0) + float(v)
                    steps_with[i][k] = steps_with[i].get(k, 0) + 1
            finished = bool(step.done[i]) or turn == max_turns - 1 or len(t.tokens) >= max_context
            if finished:
                done[i] = True
                continue
            nxt = step.observations[i]
            if nxt is None:
                raise AlignloopError(f"environment {env.name}: episode {i} is not done but has no observation")
            delta = turn_delta(tokenizer, t.messages[:-1], actions[i] or "", nxt, t.info["_stopped_on_token"])
            t.append(encode(tokenizer, delta), False)
            t.messages = list(nxt)
            t.info["turns"] = turn + 1
    for d, counts in zip(info, steps_with):
        for k in d:
            d[k] /= counts[k]
    for t, extra in zip(trajectories, info):
        t.info.pop("_stopped_on_token", None)
        t.info.update(extra)
    keys = sorted({k for d in info for k in d})
    means = {k: float(np.mean([d.get(k, 0.0) for d in info])) for k in keys}
    total = time.perf_counter() - began
    return Rollout(trajectories, version, {"generation": gen_s, "environment": total - gen_s}, means)

