"""Every algorithm takes a finite step that moves the adapters (and PPO's value head)."""

import pytest
import torch

from alignloop.rl.config import RLSection
from alignloop.rl.trainer import Trainer
from alignloop.rl.trajectory import Trajectory
from alignloop.train.config import LoraSection


def _trajectories(n=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(5, 500, (6,), generator=g).tolist()
        reply = torch.randint(5, 500, (3 + i % 4,), generator=g).tolist()
        out.append(Trajectory(prompt + reply, [False] * 6 + [True] * len(reply), [0.0] * 6 + [-6.0] * len(reply),
                              reward=float(i % 3), group=i // 4))
    return out


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo"])
def test_each_algorithm_steps(tiny, algorithm):
    from alignloop.train.lora import add_lora

    model, _ = tiny
    import copy

    torch.manual_seed(0)
    policy = add_lora(copy.deepcopy(model), LoraSection(r=4, alpha=8, dropout=0.0))
    cfg = RLSection(algorithm=algorithm, group=4, prompts_per_step=2, steps=2, lr=1e-2, micro_batch=3,
                    epochs=2 if algorithm == "ppo" else 1, kl="k3" if algorithm == "grpo" else "none",
                    beta=0.05 if algorithm == "grpo" else 0.0)
    trainer = Trainer(policy, cfg, max_tokens=8)
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters() if p.requires_grad}
    m = trainer.step(_trajectories())
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    after = dict(trainer.module.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    if algorithm == "ppo":
        assert "value_loss" in m and not torch.equal(before["value_head.weight"], after["value_head.weight"])
    if algorithm == "grpo":
        assert m["kl"] >= 0
    # The engine log-probs (-6.0) are far from the tiny model's: truncation kicks in and is logged.
    assert m["mismatch_abs"] > 0 and 0 <= m["is_truncated"] <= 1


def _grouped(n_groups=2, group=4, prompt=7):
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n_groups):
        head = torch.randint(5, 500, (prompt + k,), generator=g).tolist()
        for i in range(group):
            reply = torch.randint(5, 500, (2 + (i * 3) % 5,), generator=g).tolist()
            user = torch.randint(5, 500, (3,), generator=g).tolist()  # a second turn: user tokens mid-episode
            more = torch.randint(5, 500, (2,), generator=g).tolist()
            tokens = head + reply + user + more
            policy = [False] * len(head) + [True] * len(reply) + [False] * 3 + [True] * 2
            out.append(Trajectory(tokens, policy, [0.0] * len(tokens), reward=float(i), group=k))
    return out


def test_shared_prefix_packing_scores_every_token_as_alone(tiny):
    """One row per group with the prompt computed once gives each policy token the log-prob (and
    entropy) it gets scored on its own, in the loss's [n, T] layout."""
    from alignloop.rl.policy import PolicyLogprobs
    from alignloop.rl.trajectory import collate, collate_shared, shared_prefix

    model, _ = tiny
    ts = _grouped()
    assert shared_prefix(ts[:4]) == 6  # prompt of 7, less the token that predicts the first reply token
    module = PolicyLogprobs(model).eval()
    alone = collate(ts, list(range(len(ts))))
    packed = collate_shared([[0, 1, 2, 3], [4, 5, 6, 7]], ts)
    assert packed.input_ids.shape[1] < alone.input_ids.shape[1] * 4
    with torch.no_grad():
        a = [alone.scatter(x) for x in module(alone.input_ids, alone.position_ids, alone.allowed, alone.select,
                                              alone.targets)[:2]]
        b = [packed.scatter(x) for x in module(packed.input_ids, packed.position_ids, packed.allowed, packed.select,
                                               packed.targets)[:2]]
    assert torch.equal(alone.mask, packed.mask) and packed.index == list(range(8))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_shared_prefix_step_equals_unshared_step(tiny):
    from alignloop.train.lora import add_lora

    model, _ = tiny
    import copy

    grads = []
    for share in (False, True):
        torch.manual_seed(0)
        policy = add_lora(copy.deepcopy(model), LoraSection(r=4, alpha=8, dropout=0.0))
        cfg = RLSection(algorithm="grpo", group=4, prompts_per_step=2, steps=2, lr=1e-2, micro_batch=4,
                        share_prefix=share)
        trainer = Trainer(policy, cfg, max_tokens=8)
        m = trainer.step(_grouped())
        grads.append((m["loss"], m["grad_norm"], {n: p.detach().clone() for n, p in trainer.module.named_parameters()
                                                  if p.requires_grad}))
    assert abs(grads[0][1] - grads[1][1]) < 1e-4 * max(1.0, grads[0][1])
    for n in grads[0][2]:
        torch.testing.assert_close(grads[0][2][n], grads[1][2][n], atol=1e-5, rtol=1e-4)
