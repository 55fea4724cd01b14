"""RL keeps its promises: PPO's objective is PPO-RLHF's, a non-finite step stops cleanly, a broken
reward module is one line, `rl ppo` refuses a recipe naming another algorithm."""

import copy
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_rl_loop import recipe
from test_rl_trainer import _trajectories
from typer.testing import CliRunner

from alignloop.cli import app
from alignloop.errors import AlignloopError
from alignloop.rl.config import RLRecipe, RLSection
from alignloop.rl.env import Step
from alignloop.rl.reward_env import load_reward
from alignloop.rl.stage import run_rl
from alignloop.rl.trainer import Trainer
from alignloop.train import checkpoint as ckpt


def _by_hand(model, head, tokens, policy):
    """Each policy token's log-prob and the value before it: one unpadded forward, no packing."""
    ids = torch.tensor([tokens])
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
    logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
    logp = logp.gather(1, ids[0, 1:, None]).squeeze(1)
    scored = torch.tensor(policy[1:])
    return logp[scored], head(hidden).squeeze(-1)[scored]


def _ppo_rlhf_objective(model, head, ref, trajectories, cfg):
    """PPO-RLHF (Ziegler et al. 2019, Ouyang et al. 2022): r_t = -beta (log pi_old - log pi_ref) on
    every token, the episode reward on the last; GAE; whitened advantages; clipped policy and value
    losses, token-mean. The KL is in the reward and nowhere else."""
    logps, values, advs, returns = [], [], [], []
    for t in trajectories:
        logp, v = _by_hand(model, head, t.tokens, t.policy)
        with torch.no_grad():
            ref_logp, _ = _by_hand(ref, head, t.tokens, t.policy)
        old, v_old = logp.detach(), v.detach()
        r = -cfg.beta * (old - ref_logp)
        r[-1] += t.reward
        adv, running, next_v = torch.zeros_like(r), 0.0, 0.0
        for i in reversed(range(len(r))):
            running = r[i] + cfg.gamma * next_v - v_old[i] + cfg.gamma * cfg.lam * running
            adv[i], next_v = running, v_old[i]
        logps.append(logp), values.append(v), advs.append(adv), returns.append(adv + v_old)
    flat = torch.cat(advs)
    advs = [(a - flat.mean()) / (flat.std() + 1e-8) for a in advs]
    n = flat.numel()
    total = torch.zeros(())
    for logp, v, a, ret in zip(logps, values, advs, returns):
        ratio = torch.exp(logp - logp.detach())
        pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - cfg.clip_low, 1 + cfg.high))
        v_old = v.detach()
        v_clip = v_old + (v - v_old).clamp(-cfg.value_clip, cfg.value_clip)
        vl = 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
        total = total + pg.sum() / n + cfg.vf_coef * vl.sum() / n
    return total


def test_ppo_with_beta_is_the_ppo_rlhf_objective(tiny):
    """PPO with beta > 0 charges the KL once, in the per-token reward: value and gradient equal the
    PPO-RLHF objective computed by hand on the same inputs."""
    model, _ = tiny
    torch.manual_seed(0)
    policy = copy.deepcopy(model).requires_grad_(True)
    cfg = RLSection(algorithm="ppo", group=4, prompts_per_step=1, steps=1, lr=1e-3, micro_batch=8, lora=None,
                    kl="k1", beta=0.5, tis_cap=None, max_grad_norm=None, share_prefix=False)
    trainer = Trainer(policy, cfg, max_tokens=8)
    ref = copy.deepcopy(policy).requires_grad_(False)  # the trainer's reference: the policy before training
    with torch.no_grad():  # a policy that has moved away from its reference, and a critic with opinions
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        trainer.module.value_head.weight.normal_(0.0, 0.05)
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    ts = _trajectories(4)
    expected = _ppo_rlhf_objective(policy, trainer.module.value_head, ref, ts, cfg)
    grads = torch.autograd.grad(expected, params)

    m = trainer.step(ts)
    assert abs(m["loss"] - expected.item()) < 1e-6
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    assert m["kl"] != 0  # still measured and logged, just not charged twice


class InfiniteAt:
    """An environment paying for length, whose reward at episode `bad` of call `at` is infinite."""

    name = "inf"

    def __init__(self, at: int, bad: int = 1):
        self.calls, self.at, self.bad = 0, at, bad

    def sample_tasks(self, n, seed):
        return list(range(n))

    def reset(self, tasks):
        return [[{"role": "user", "content": f"Tell me about topic {t}."}] for t in tasks]

    def step(self, actions):
        self.calls += 1
        rewards = np.array([len(a or "") / 50.0 for a in actions])
        if self.calls == self.at:
            rewards[self.bad] = np.inf
        return Step([None] * len(actions), rewards, np.ones(len(actions), dtype=bool), [{} for _ in actions])


def _recipe(tmp_path, **rl):
    return recipe(tmp_path, steps=3, save_every=1, **rl)  # test_rl_loop's tiny recipe, checkpointing each step


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_non_finite_reward_stops_naming_the_step_and_writes_nothing(tmp_path, algorithm):
    with pytest.raises(AlignloopError, match=r"^step 3: non-finite reward inf at sample 1;.*checkpoint.*intact"):
        run_rl(_recipe(tmp_path, algorithm=algorithm), env=InfiniteAt(at=3))
    stage = tmp_path / "t" / f"rl-{algorithm}"
    rows = [json.loads(x, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(stage / "checkpoints")] == [1, 2]


def test_non_finite_loss_stops_before_the_update(tiny):
    model, _ = tiny
    policy = copy.deepcopy(model).requires_grad_(True)
    cfg = RLSection(algorithm="grpo", group=4, prompts_per_step=1, steps=1, lr=1e-3, micro_batch=8, lora=None)
    trainer = Trainer(policy, cfg, max_tokens=8)
    with torch.no_grad():
        policy.get_output_embeddings().weight[7, 0] = float("nan")  # a weight gone bad: NaN logits everywhere
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    with pytest.raises(AlignloopError, match=r"^non-finite loss \(nan\)"):
        trainer.step(_trajectories(4))
    after = dict(trainer.module.named_parameters())
    assert all(torch.equal(before[n].nan_to_num(), after[n].detach().nan_to_num()) for n in before)


BROKEN = {
    "raises": ("def factory():\n    raise RuntimeError('no scorer weights in /nowhere')\n",
               r"RuntimeError: no scorer weights in /nowhere"),
    "syntax": ("def factory(:\n    pass\n", r"SyntaxError: .*line 1"),
    "import": ("raise ImportError('needs the scorer extra')\n", r"ImportError: needs the scorer extra"),
    "missing_attr": ("def other():\n    pass\n", r"has no attribute 'factory'"),
}


@pytest.mark.parametrize("case", [*BROKEN, "missing_module"])
def test_broken_reward_module_is_one_line_naming_the_key(tmp_path, monkeypatch, case):
    module = f"trust_reward_{case}"
    source, cause = BROKEN.get(case, (None, rf"No module named '{module}'"))
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AlignloopError) as e:
        load_reward(f"{module}:factory")
    message = str(e.value)
    assert message.startswith(f"env.reward = '{module}:factory': ") and "\n" not in message
    assert re.search(cause, message), message
    sys.modules.pop(module, None)


def test_rl_ppo_refuses_a_recipe_naming_another_algorithm(tmp_path, monkeypatch):
    import alignloop.rl.stage as rl_stage

    ran = []
    monkeypatch.setattr(rl_stage, "run_rl", lambda recipe, **kw: ran.append(recipe.rl.algorithm)
                        or SimpleNamespace(dir=tmp_path))
    runner = CliRunner()
    named = runner.invoke(app, ["rl", "ppo", "recipes/grpo_tiny.toml"])  # the recipe says grpo
    assert isinstance(named.exception, AlignloopError) and "rl.algorithm = 'grpo'" in str(named.exception)
    assert "alignloop rl grpo" in str(named.exception) and "\n" not in str(named.exception)
    overridden = runner.invoke(app, ["rl", "ppo", "recipes/grpo_tiny.toml", "--set", "rl.algorithm=dapo"])
    assert isinstance(overridden.exception, AlignloopError) and "'dapo'" in str(overridden.exception)
    # A recipe that names no algorithm, or names ppo, is PPO's.
    plain = tmp_path / "plain.toml"
    plain.write_text('[model]\nname = "tiny"\n[rl]\ngroup = 1\n')
    assert runner.invoke(app, ["rl", "ppo", str(plain)]).exit_code == 0
    assert runner.invoke(app, ["rl", "ppo", "recipes/grpo_tiny.toml", "--set", "rl.algorithm=ppo"]).exit_code == 0
    assert ran == ["ppo", "ppo"]


@pytest.mark.parametrize("kind", ["reward_model", "user_sim"])
@pytest.mark.parametrize("inside", [True, False])
def test_a_retrained_reward_model_is_an_input_of_the_rl_stage(tmp_path, kind, inside):
    """env.reward = an `rm train` folder (or the run folder holding it): its manifest is an input, so
    RL against a reward model trained again runs again instead of being 'up to date'."""
    rm = tmp_path / "run" / "rm"
    rm.mkdir(parents=True)
    (rm / "manifest.json").write_text("{}")
    env = {"kind": kind, "reward": str(rm if inside else rm.parent), "groundtruth": True}
    section = RLRecipe.model_validate({"env": env}).env
    assert str(rm / "manifest.json") in [str(p) for p in section.inputs()]
