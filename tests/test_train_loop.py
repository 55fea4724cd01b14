"""The shared training loop: schedules, grad accumulation, checkpoints, and exact resume after SIGKILL."""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignloop.recipes import load_recipe
from alignloop.runs import Stage
from alignloop.train import checkpoint as ckpt
from alignloop.train.config import TrainSection
from alignloop.train.loop import accumulate, make_optimizer, train
from alignloop.train.schedule import Schedule, make_scheduler

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "sft_tiny.toml"


# --- schedules ---------------------------------------------------------------------------------


def test_cosine_warms_up_linearly_then_decays_to_min_ratio():
    s = Schedule("cosine", total_steps=100, warmup_steps=10, min_ratio=0.1)
    values = [s(i) for i in range(100)]
    assert values[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # monotone after warmup
    assert values[-1] == pytest.approx(0.1)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5, abs=0.02)  # half way: the mid point


def test_multistep_is_deepseek_llm_schedule():
    s = Schedule("multistep", total_steps=1000, warmup_steps=20)
    assert s(0) == pytest.approx(1 / 20) and s(19) == pytest.approx(1.0)
    assert s(20) == s(500) == s(799) == 1.0
    assert s(800) == s(899) == 0.316
    assert s(900) == s(999) == 0.1


def test_constant_and_scheduler_state_is_plain_json():
    s = Schedule("constant", total_steps=10, warmup_steps=0)
    assert [s(i) for i in range(10)] == [1.0] * 10
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = make_scheduler(opt, Schedule("cosine", 10, 2))
    state = json.loads(json.dumps(sched.state_dict()))  # round-trips through JSON
    assert state["lr_lambdas"][0]["kind"] == "cosine"
    assert sched.get_last_lr()[0] == pytest.approx(0.5)  # first step: 1/warmup of the peak


def test_unknown_schedule_and_lora_off_switch():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 10)
    assert TrainSection(lora={"r": 4}).lora.r == 4
    assert TrainSection(lora=False).lora is None  # --set train.lora=false


def test_parallel_is_a_train_key_of_every_trainer():
    """`train.parallel` lives in the shared TrainSection: SFT, DPO and distill recipes all take it."""
    from alignloop.errors import AlignloopError
    from alignloop.train import dist
    from alignloop.train.config import DistillRecipe, DPORecipe, SFTRecipe

    assert TrainSection().parallel.strategy == "ddp" and dist.strategy_of(TrainSection()) == "ddp"
    for name, recipe_class in (("sft", SFTRecipe), ("dpo", DPORecipe), ("distill", DistillRecipe)):
        recipe = load_recipe(REPO / "recipes" / f"{name}_tiny.toml", recipe_class, ["train.parallel=fsdp"])
        assert isinstance(recipe.train, TrainSection)
        assert recipe.train.parallel.strategy == "fsdp" and dist.strategy_of(recipe.train) == "fsdp"
        with pytest.raises(AlignloopError, match="train.parallel"):
            load_recipe(REPO / "recipes" / f"{name}_tiny.toml", recipe_class, ["train.parallel=zero3"])


# --- gradient accumulation ---------------------------------------------------------------------


def _sft_parts(tiny, micro_batch):
    from alignloop.train.sft_data import PackedBatches, read_conversations, tokenize

    _, tokenizer = tiny
    examples, _ = tokenize(tokenizer, read_conversations(REPO / "recipes/data/sft_demo.jsonl"), 128)
    return PackedBatches(examples, 128, micro_batch, seed=3)


def test_grad_accumulation_matches_one_big_batch(tiny):
    """accum 4 x micro 1 == micro 4 x accum 1 in fp32: same mean loss, same gradient (rel. 1e-5)."""
    from alignloop.train.logprobs import TokenLogprobs
    from alignloop.train.sft import SFTObjective

    model, _ = tiny
    module, objective = TokenLogprobs(model), SFTObjective()
    model.requires_grad_(True)
    grads, losses = [], []
    for micro_batch, accum in ((4, 1), (1, 4)):
        batches = _sft_parts(tiny, micro_batch)(0)
        micro = [batches[i] for i in range(accum)]
        weight = sum(objective.weight(b) for b in micro)
        model.zero_grad(set_to_none=True)
        loss, _ = accumulate(module, objective, micro, weight, torch.device("cpu"), bf16=False)
        losses.append(loss / weight)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    scale = grads[0].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * scale


# --- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_roundtrip_and_torn_writes_are_ignored(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    config = TrainSection(lr=0.1, steps=5)
    opt = make_optimizer(net, config)
    sched = make_scheduler(opt, Schedule("cosine", 5, 1))
    for _ in range(2):
        net(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        sched.step()
    path = ckpt.save_checkpoint(tmp_path, 2, net, opt, sched, {"epoch": 0, "index": 2})
    (tmp_path / ".step-000003.dead.tmp").mkdir()  # what a kill during a write leaves behind
    assert ckpt.latest_checkpoint(tmp_path) == path
    expected_next = torch.rand(3)

    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt2 = make_optimizer(fresh, config)
    sched2 = make_scheduler(opt2, Schedule("cosine", 5, 1))
    torch.manual_seed(0)
    torch.rand(3)  # RNG elsewhere: the checkpoint must restore it
    state = ckpt.load_checkpoint(path, fresh, opt2, sched2)
    assert state["index"] == 2 and state["step"] == 2
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the moment of saving
    for a, b in zip(net.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


# --- kill and resume ---------------------------------------------------------------------------

# The child trains the tiny recipe and SIGKILLs itself right after step KILL_AT (between two
# checkpoints, so steps after the last checkpoint are lost and must be redone identically).
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(2)
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    recipe, kill_at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def die(step, metrics):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_sft(load_recipe(recipe, SFTRecipe, overrides), callbacks=[die])
""")

_KILL_OVERRIDES = [
    "train.steps=16", "train.save_every=4", "train.eval_every=0", "train.max_seq_len=128",
    "train.micro_batch=1", "train.grad_accum=2", "train.lora.r=4", "train.lora.dropout=0.1",
]


def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path):
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    # The killed run, in a child process.
    killed = _KILL_OVERRIDES + [f"run.dir={tmp_path / 'killed'}", "run.name=r"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(TINY_RECIPE), "10", *killed],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == -9, child.stderr[-2000:]  # it really died by SIGKILL
    stage_dir = tmp_path / "killed" / "r" / "sft"
    assert [step for step, _ in ckpt.list_checkpoints(stage_dir / "checkpoints")] == [4, 8]
    assert not (stage_dir / "manifest.json").exists()

    # Start it again (same recipe): resumes from step 8 and finishes.
    resumed = run_sft(load_recipe(TINY_RECIPE, SFTRecipe, killed))
    manifest = json.loads(resumed.path("manifest.json").read_text())
    assert manifest["train"]["resumed_from"] == 8 and manifest["train"]["steps"] == 16
    steps_logged = [json.loads(line)["step"] for line in resumed.path("metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 17))  # killed steps 9-10 were not logged twice

    # The same run, never interrupted.
    clean = run_sft(load_recipe(TINY_RECIPE, SFTRecipe,
                                _KILL_OVERRIDES + [f"run.dir={tmp_path / 'clean'}", "run.name=r"]))

    a = load_file(resumed.path("model") / "model.safetensors")
    b = load_file(clean.path("model") / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    last = [json.loads(s.path("metrics.jsonl").read_text().splitlines()[-1])["loss"] for s in (resumed, clean)]
    assert last[0] == last[1]


def test_checkpoints_of_another_config_are_not_resumed(tmp_path, tiny):
    """A changed recipe must never pick up moments and weights trained under the old one."""
    net = torch.nn.Linear(2, 2)
    config = TrainSection(lr=0.1, steps=2, save_every=1)

    def data(epoch):
        return [torch.ones(1, 2)] * 2

    class Objective:
        def weight(self, batch):
            return 1.0

        def loss(self, module, batch):
            return module(batch).square().sum(), {}

    first = train(net, Objective(), data, config, Stage(tmp_path, "r", "t", {"lr": 0.1}))
    assert first.steps == 2 and first.resumed_from == 0
    again = train(net, Objective(), data, config, Stage(tmp_path, "r", "t", {"lr": 0.1}))
    assert again.resumed_from == 2  # same config: nothing left to do
    changed = train(net, Objective(), data, config, Stage(tmp_path, "r", "t", {"lr": 0.2}))
    assert changed.resumed_from == 0 and changed.steps == 2


# --- experiment trackers -----------------------------------------------------------------------


def _tiny_loop(tmp_path, **config):
    net = torch.nn.Linear(2, 2)

    class Objective:
        def weight(self, batch):
            return 1.0

        def loss(self, module, batch):
            return module(batch).square().sum(), {}

    stage = Stage(tmp_path, "r", "t", {"lr": 0.1})
    return train(net, Objective(), lambda epoch: [torch.ones(1, 2)] * 2,
                 TrainSection(lr=0.1, steps=3, save_every=10, **config), stage), stage


def test_tensorboard_tracker_gets_the_loss_of_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, stage = _tiny_loop(tmp_path, track=["tensorboard"])
    events = EventAccumulator(str(stage.path("tensorboard")))
    events.Reload()
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    logged = [json.loads(line)["loss"] for line in stage.path("metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in losses] == pytest.approx(logged)


def test_tracker_is_validated_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    from alignloop.errors import AlignloopError

    with pytest.raises(ValueError, match="track"):
        TrainSection(track=["wandb"])
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if not installed
    with pytest.raises(AlignloopError, match="alignloop\\[track\\]"):
        _tiny_loop(tmp_path, track=["trackio"])
