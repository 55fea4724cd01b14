"""Multi-turn user-simulator environment: simulated users write, learned reward models judge.

Simulated users from the user world (`alignloop.sim`) write each next user message, in their own
style and on their own topics. Whether a user stays for another turn and the reward of every bot
turn come from a *learned* `RewardFn` (e.g. the p(continue) head in its `continue` component),
never from the simulator's hidden traits or true engagement: those are the evaluation's ground
truth, and training on them would be training on the test.

An episode: the user's first message; the policy answers; the RewardFn scores the answer; the user
stays with probability p(continue) (seeded coin, so episodes replay exactly) for up to max_turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from pydantic import Field

from alignloop.rewards.api import RewardFn, validated
from alignloop.rl.env import Step
from alignloop.rl.reward_env import LearnedRewardSection, load_reward
from alignloop.sim.lexicon import PIECES
from alignloop.sim.messages import write_messages
from alignloop.sim.traits import sample_population

UserWriter = Callable[[list[int], int], list[str]]  # (user ids, turn) -> one new message each


def chat_population(seed: int = 0, population: int = 256):
    """The simulated users the environment talks to (readers only: no bots or skimmers); user id u is
    row u % population. Their hidden taste is for evaluation only (`alignloop.eval.rl_hook`)."""
    return sample_population(np.random.default_rng(seed), 0, population, days=7, bot_fraction=0.0,
                             skimmer_fraction=0.0, activity_median=5.0, activity_sigma=0.5)


def sim_users(seed: int = 0, population: int = 256) -> UserWriter:
    """Users from the simulated world: their next message as text (pieces rendered by the lexicon)."""
    pop = chat_population(seed, population)

    def write(users: list[int], turn: int) -> list[str]:
        rng = np.random.default_rng([seed, turn, *users])
        pieces = write_messages(rng, pop, np.asarray(users) % population)
        return [PIECES.render_one(row) or "hi" for row in pieces]

    return write


class UserSimEnvSection(LearnedRewardSection):
    """`[env] kind = "user_sim"`: simulated users write the user turns; the learned reward says
    whether they stay. With groundtruth, the same users' hidden taste is the evaluation."""

    kind: Literal["user_sim"] = "user_sim"
    stay_component: str = Field("continue", description="the reward component that is p(user stays)")

    def build(self, prompts: list[list[dict]] | None = None) -> UserSimEnv:
        return UserSimEnv(load_reward(self.reward), sim_users(self.users_seed, self.users), n_users=self.users,
                          max_turns=self.max_turns, stay_component=self.stay_component, system=self.system)


class UserSimEnv:
    name = "user_sim"

    def __init__(self, reward: RewardFn, users: UserWriter, n_users: int = 256, max_turns: int = 3,
                 stay_component: str = "continue", system: str | None = None) -> None:
        self.reward = validated(reward)
        self.users = users
        self.n_users = n_users
        self.max_turns = max_turns
        self.stay_component = stay_component
        self.system = system
        self._users: list[int] = []
        self._conversations: list[list[dict]] = []
        self._turn = 0
        self._done = np.zeros(0, dtype=bool)

    def sample_tasks(self, n: int, seed: int) -> list[int]:
        return list(np.random.default_rng([seed, 17]).integers(0, self.n_users, n))

    def reset(self, tasks: list[int]) -> list[list[dict]]:
        self._users = [int(u) for u in tasks]
        self._turn = 0
        self._done = np.zeros(len(tasks), dtype=bool)
        head = [{"role": "system", "content": self.system}] if self.system else []
        first = self.users(self._users, 0)
        self._conversations = [head + [{"role": "user", "content": m}] for m in first]
        return [list(c) for c in self._conversations]

    def step(self, actions: list[str | None]) -> Step:
        n = len(actions)
        live = [i for i in range(n) if actions[i] is not None and not self._done[i]]
        rewards, info = np.zeros(n), [{} for _ in range(n)]
        batch = self.reward([self._conversations[i] for i in live], [actions[i] for i in live])
        # The probability itself (raw/...), not the normalised component the combined reward sums.
        stay = batch.components.get(f"raw/{self.stay_component}", batch.components.get(self.stay_component))
        p = np.clip(stay, 0.0, 1.0) if stay is not None else np.zeros(len(live))
        coins = np.random.default_rng([self._turn, *self._users]).random(n)
        self._turn += 1
        stays = []
        for j, i in enumerate(live):
            rewards[i] = batch.reward[j]
            info[i] = {"p_continue": float(p[j]), "unsafe": float(batch.unsafe[j])}
            self._conversations[i] = self._conversations[i] + [{"role": "assistant", "content": actions[i]}]
            stayed = coins[i] < p[j] and self._turn < self.max_turns
            self._done[i] = not stayed
            if stayed:
                stays.append(i)
        for i, message in zip(stays, self.users([self._users[i] for i in stays], self._turn) if stays else []):
            self._conversations[i] = self._conversations[i] + [{"role": "user", "content": message}]
        obs: list[Any] = [list(self._conversations[i]) if not self._done[i] else None for i in range(n)]
        return Step(obs, rewards, self._done.copy(), info)
