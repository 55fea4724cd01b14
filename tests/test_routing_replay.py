"""Routing replay: the experts our engine chose reach the trainer's forward, which then routes alike."""

from __future__ import annotations

import pytest
import torch

from alignloop.engine.api import SamplingParams
from alignloop.engine.engine import Engine
from alignloop.models import load_model
from alignloop.models.deepseek import MoE
from alignloop.rl.config import RLSection
from alignloop.rl.trainer import Trainer
from alignloop.rl.trajectory import Trajectory, collate, collate_shared

PROMPTS = [[5, 17, 99, 3, 41, 8], [5, 17, 99, 3, 41, 8], [7, 7, 2]]


pytestmark = pytest.mark.usefixtures("one_thread")  # a 6M-parameter model: one thread


def _traj(tokens: list[int], first_policy: int, layers: int = 2, K: int = 2, base: int = 0) -> Trajectory:
    n = len(tokens)
    policy = [i >= first_policy for i in range(n)]
    # Distinct experts per (layer, token): value = base + 10 * layer + token position, both K equal.
    routing = torch.tensor([[[base + 10 * layer + j] * K for j in range(n - 1)] for layer in range(layers)],
                           dtype=torch.int16)
    return Trajectory(tokens, policy, [-1.0 if p else 0.0 for p in policy], routing=routing)


def test_collate_places_each_tokens_experts_and_marks_the_unfed_last_token():
    a, b = _traj([1, 2, 3, 4, 5], 3), _traj([1, 2, 3], 2, base=100)
    batch = collate([a, b], [0, 1])
    assert len(batch.routing) == 2 and batch.routing[0].shape == (2, 5, 2)
    for layer in range(2):
        assert batch.routing[layer][0, :4, 0].tolist() == [10 * layer + j for j in range(4)]
        assert batch.routing[layer][1, :2, 0].tolist() == [100 + 10 * layer + j for j in range(2)]
    # The last token of each sequence was never fed to the engine, and padding has nothing: -1.
    assert batch.routing[0][0, 4].tolist() == [-1, -1]
    assert batch.routing[0][1, 2:].flatten().tolist() == [-1] * 6


def test_shared_prefix_rows_take_the_prefix_from_one_member_and_each_reply_from_its_own():
    a, b = _traj([1, 2, 3, 4, 5, 6], 4), _traj([1, 2, 3, 4, 9, 8, 7], 4, base=100)
    batch = collate_shared([[0, 1]], [a, b])
    # Prefix: tokens 0..2 (the token before the first reply token is not shared), then a's tokens
    # 3..5, then b's tokens 3..6; each at its own routing, -1 on each sequence's last token.
    row = batch.routing[1][0, :, 0].tolist()
    assert row[:3] == [10, 11, 12]
    assert row[3:6] == [13, 14, -1]
    assert row[6:10] == [113, 114, 115, -1]


def test_forced_rows_win_and_negative_rows_keep_the_routers_choice():
    torch.manual_seed(0)
    net, _ = load_model("tiny-deepseek", seed=0)
    moe = next(m for m in net.modules() if isinstance(m, MoE))
    x = torch.randn(1, 3, net.config.hidden_size)
    with torch.no_grad():
        _, own, _ = moe(x)
        forced = own.clone()
        forced[0, 0] = torch.tensor([0, 1])
        forced[0, 2] = -1
        _, used, _ = moe(x, forced)
    assert used[0, 0].tolist() == [0, 1]
    assert used[0, 1].tolist() == own[0, 1].tolist() and used[0, 2].tolist() == own[0, 2].tolist()


def _gap(trainer: Trainer, trajectories: list[Trajectory], replay: bool) -> float:
    trainer.cfg.routing_replay = replay
    b = collate(trajectories, list(range(len(trajectories))))
    with torch.no_grad():
        logp = b.scatter(trainer._forward(trainer.module, b)[0])
    return float((logp - b.rollout_logp).abs()[b.mask].max())


def test_trainer_replaying_the_engines_routing_matches_its_logprobs_where_its_own_router_does_not():
    net, tokenizer = load_model("tiny-deepseek", seed=0)
    engine = Engine(net, tokenizer, dtype="float32", max_batch=4, show_progress=False, record_routing=True)
    outs = engine.generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=12, seed=i, ignore_eos=True)
                                     for i in range(len(PROMPTS))])
    trajectories = [Trajectory(p + o.token_ids, [False] * len(p) + [True] * len(o.token_ids),
                               [0.0] * len(p) + list(o.logprobs), routing=o.routing) for p, o in zip(PROMPTS, outs)]
    trainer = Trainer(net, RLSection(bf16=False, lr=1e-3), temperature=1.0)
    assert _gap(trainer, trajectories, replay=True) < 1e-4  # same weights, same experts: numerics only
    # The trainer's router now disagrees with the engine's copy (its selection bias moved, as a bias
    # update or a weight sync in flight would do): its own routing changes the log-probs...
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MoE):
                m.gate.e_score_correction_bias.copy_(torch.linspace(1.0, -1.0, m.gate.e_score_correction_bias.numel()))
    assert _gap(trainer, trajectories, replay=False) > 1e-2
    # ...and replaying the engine's choice brings them back: the bias only ever selects.
    assert _gap(trainer, trajectories, replay=True) < 1e-4


def test_replay_check_runs_both_sides_and_replay_narrows_the_gap(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.rl.config import RLRecipe
    from alignloop.rl.replay_check import replay_check

    recipe = load_recipe("recipes/grpo_moe_tiny.toml", RLRecipe, [
        f"run.dir={tmp_path}", "rl.steps=2", "rl.prompts_per_step=2", "rl.group=4", "rl.save_every=2",
        "sampling.max_tokens=8", "env.eval_tasks=2"])
    out = replay_check(recipe, "check")
    assert out["steps"] == 2 and out["trained_without_replay"]
    # bf16 trainer vs fp32 engine: replaying the engine's experts leaves only the dtype's rounding.
    assert 0 < out["gap_with_replay"] < out["gap_without_replay"]
    assert (tmp_path / "check-replay" / "rl-grpo" / "metrics.jsonl").exists()
    assert (tmp_path / "check-noreplay" / "rl-grpo" / "metrics.jsonl").exists()
