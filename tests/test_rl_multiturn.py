"""Multi-turn episodes with simulated users: only the policy's own tokens carry loss (mask audit)."""

import numpy as np

from alignloop.engine.api import SamplingParams
from alignloop.rewards.api import RewardBatch
from alignloop.rl.inference import Inference
from alignloop.rl.rollout import play
from alignloop.rl.trajectory import collate
from alignloop.rl.user_env import UserSimEnv, sim_users


class StayReward:
    """A stand-in learned reward: p(continue) 1 (users always stay), reward = reply length."""

    def __call__(self, contexts, responses):
        n = len(responses)
        return RewardBatch(np.array([len(r) / 100 for r in responses]), {"continue": np.ones(n)})


def _runs(flags):
    runs, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_sim_users_write_text_and_replay():
    write = sim_users(seed=3)
    a, b = write([1, 2, 3], 0), write([1, 2, 3], 0)
    assert a == b and all(isinstance(m, str) and m for m in a)
    assert write([1, 2, 3], 1) != a  # next turn, new messages


def test_multi_turn_mask_audit(tiny):
    from alignloop.engine.engine import Engine

    model, tokenizer = tiny
    inference = Inference(Engine(model, tokenizer, dtype="float32", max_batch=8, show_progress=False))
    env = UserSimEnv(StayReward(), sim_users(seed=1), max_turns=3)
    rollout = play(env, inference, tokenizer, env.sample_tasks(2, seed=0), group=2,
                   sampling=SamplingParams(temperature=1.0, max_tokens=6), seed=0, max_turns=3)
    for t in rollout.trajectories:
        assistant = [m["content"] for m in t.messages if m["role"] == "assistant"]
        users = [m["content"] for m in t.messages if m["role"] == "user"]
        assert len(assistant) == 3 and len(users) == 3  # stayed for every turn
        runs = _runs(t.policy)
        # One run of policy tokens per bot turn, each exactly the reply the environment saw.
        assert len(runs) == len(assistant)
        for (s, e), text in zip(runs, assistant):
            assert tokenizer.decode(t.tokens[s:e], skip_special_tokens=True) == text
        # Everything else (template, user turns) is context: every user message is in it.
        context = tokenizer.decode([tok for tok, p in zip(t.tokens, t.policy) if not p])
        assert all(u in context for u in users)
        # Log-probs only where the policy sampled.
        assert all(lp == 0.0 for lp, p in zip(t.rollout_logp, t.policy) if not p)
        assert all(lp < 0.0 for lp, p in zip(t.rollout_logp, t.policy) if p)
        # The conversation as the template renders it, token for token where the policy did not write.
        rendered = tokenizer.apply_chat_template(t.messages, tokenize=False)
        assert rendered.startswith(tokenizer.decode(t.tokens[: runs[0][0]]))
        assert t.reward > 0
        # Per-reply info is averaged over the episode's three replies: a probability stays in [0, 1].
        assert t.info["p_continue"] == 1.0 and t.info["unsafe"] == 0.0
    assert rollout.info["p_continue"] == 1.0
    # The trainer's loss positions are exactly the policy tokens.
    batch = collate(rollout.trajectories, list(range(len(rollout.trajectories))))
    for row, t in enumerate(rollout.trajectories):
        n = len(t.tokens)
        assert batch.mask[row, : n - 1].tolist() == t.policy[1:]
        assert not batch.mask[row, n - 1:].any()
    expected = [tok for t in rollout.trajectories for tok, p in zip(t.tokens[1:], t.policy[1:]) if p]
    assert batch.targets.tolist() == expected


def test_tool_env_runs_parsed_calls_and_appends_tool_turns():
    from alignloop.rl.tool_env import ToolEnv

    schema = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
    env = ToolEnv(tasks=lambda n, seed: [(2, 3)] * n,
                  first_messages=lambda t: [{"role": "user", "content": f"add {t[0]} and {t[1]}"}],
                  tools={"add": lambda a, b: a + b}, schemas=schema, family="qwen2.5",
                  judge=lambda task, messages: float(messages[-1]["content"].strip() == str(sum(task))))
    env.reset(env.sample_tasks(2, 0))
    call = '<tool_call>\n{"name": "add", "arguments": {"a": "2", "b": 3}}\n</tool_call>'
    step = env.step([call, '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'])
    assert not step.done.any()
    assert step.observations[0][-1] == {"role": "tool", "name": "add", "content": "5"}  # "2" typed to 2
    assert "unknown tool" in step.observations[1][-1]["content"]
    final = env.step(["5", "6"])
    assert final.done.all() and final.rewards.tolist() == [1.0, 0.0]


def test_multi_turn_ground_truth_scores_each_reply_by_its_own_users_taste(tiny):
    from alignloop.engine.engine import Engine
    from alignloop.eval.groundtruth import score_texts
    from alignloop.eval.rl_hook import simulated_users_groundtruth
    from alignloop.rl.hacking import HackingWatch, bot_turns
    from alignloop.rl.user_env import chat_population
    from alignloop.sim import engagement as eg

    model, tokenizer = tiny
    inference = Inference(Engine(model, tokenizer, dtype="float32", max_batch=8, show_progress=False))
    env = UserSimEnv(StayReward(), sim_users(seed=5, population=32), n_users=32, max_turns=2)
    tasks = env.sample_tasks(3, seed=1)
    rollout = play(env, inference, tokenizer, tasks, group=2,
                   sampling=SamplingParams(temperature=1.0, max_tokens=6), seed=0, max_turns=2)
    assert [t.task for t in rollout.trajectories] == [u for u in tasks for _ in range(2)]

    score = simulated_users_groundtruth(users=32, seed=5)
    contexts, responses, owner = bot_turns(rollout.trajectories)
    users = [rollout.trajectories[e].task for e in owner]
    got = score(contexts, responses, users)
    # By hand: reply i, judged by user users[i] of the env's own population, after the earlier bot turns.
    pop = chat_population(5, 32)
    last_user = [[m["content"] for m in c if m["role"] == "user"][-1] for c in contexts]
    history = [[m["content"] for m in c if m["role"] == "assistant"] for c in contexts]
    want = score_texts(responses, last_user, eg.Taste.of(pop, np.asarray(users)), history).engagement
    np.testing.assert_allclose(got, want)
    assert any(h for h in history)  # second turns are judged after the first
    # Another user's taste gives other numbers: the score really is per user.
    shifted = score(contexts, responses, [(u + 1) % 32 for u in users])
    assert not np.allclose(shifted, got)
    # The watch hands each reply's user through.
    metrics = HackingWatch(score).score(0, rollout.trajectories)
    assert np.isfinite(metrics["gt/engagement"])


def test_users_stay_with_the_raw_probability_not_the_normalised_component():
    class Normalised:
        def __call__(self, contexts, responses):
            n = len(responses)
            # raw p(continue) = 1, its normalised component negative: users must stay
            return RewardBatch(np.zeros(n), {"raw/continue": np.ones(n), "continue": np.full(n, -2.0)})

    env = UserSimEnv(Normalised(), sim_users(seed=1), max_turns=3)
    env.reset([1, 2])
    step = env.step(["hello there", "hi"])
    assert not step.done.any() and all(i["p_continue"] == 1.0 for i in step.info)
