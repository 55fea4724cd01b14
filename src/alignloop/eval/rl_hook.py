"""Ground truth for RL's reward-hacking watch: held-out simulated users' prompts and their true taste.

RL (`alignloop.rl`) never imports evaluation; the CLI builds this here and hands the RL loop two
things: the prompts (fresh users' first messages, their traits not included) and a scoring
callable (contexts, responses) -> each reply's true engagement for the user who wrote the context.
The loop only logs what the callable says, next to the learned reward of the same replies.
"""

from __future__ import annotations

import numpy as np

from alignloop.eval.groundtruth import score_texts
from alignloop.eval.heldout import UsersSection, heldout_prompts
from alignloop.rl.user_env import chat_population
from alignloop.sim import engagement as eg


def heldout_groundtruth(users: int = 200, seed: int = 1000):
    """(prompts, score): prompts as chat messages; score(contexts, responses) -> true engagement [n]."""
    held = heldout_prompts(UsersSection(seed=seed, users=users))
    row_of = {}
    for r, text in enumerate(held.user_texts):
        row_of.setdefault(text, r)  # a context is traced to its writer by the first user message

    def score(contexts: list[list[dict]], responses: list[str], tasks: list | None = None) -> np.ndarray:
        rows = []
        for c in contexts:
            first = next((m["content"] for m in c if m.get("role") == "user"), None)
            if first not in row_of:
                raise KeyError("a context that no held-out user wrote: cannot score it against ground truth")
            rows.append(row_of[first])
        t = held.taste
        taste = eg.Taste(*(np.asarray(getattr(t, k))[rows] for k in ("pref_len", "question", "emoji", "gesture",
                                                                       "topics")))
        last_user, history = _last_user_and_history(contexts)
        return score_texts(responses, last_user, taste, history).engagement

    return held.messages, score


def _last_user_and_history(contexts: list[list[dict]]) -> tuple[list[str], list[list[str]]]:
    last_user = [next(m["content"] for m in reversed(c) if m.get("role") == "user") for c in contexts]
    history = [[m["content"] for m in c if m.get("role") == "assistant"] for c in contexts]
    return last_user, history


def simulated_users_groundtruth(users: int = 256, seed: int = 0):
    """score(contexts, responses, tasks) -> true engagement [n] for the multi-turn user-sim environment:
    tasks[i] is the id of the simulated user who wrote reply i's conversation (every user turn of it),
    so each reply is judged by that user's hidden taste, after the bot turns before it."""
    pop = chat_population(seed, users)

    def score(contexts: list[list[dict]], responses: list[str], tasks: list | None = None) -> np.ndarray:
        if tasks is None or len(tasks) != len(responses):
            raise ValueError("user-sim ground truth needs the user id (task) of every reply")
        rows = np.asarray([int(t) % users for t in tasks])
        last_user, history = _last_user_and_history(contexts)
        return score_texts(responses, last_user, eg.Taste.of(pop, rows), history).engagement

    return score
