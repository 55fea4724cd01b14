"""Multi-process training: 2 processes under torchrun (CPU, gloo) train as 1 process does.

One `torchrun --nproc_per_node 2` launch runs four tiny SFT recipes through the CLI, DDP and FSDP2,
full fine-tuning and LoRA, even and uneven splits of the step's micro batches. Each must give the
single-process loss curve, eval loss and final weights with the same global batch
(micro_batch x grad_accum rows) within fp32 summation-order noise: 1e-5 relative on losses.
A 2-process FSDP2 checkpoint must then resume in a single process, since checkpoints are
gathered full tensors whatever the world size. The same launch also runs a DPO recipe (FSDP2,
LoRA: rank 0 alone computes and caches the reference) and a logit-distillation recipe (DDP: rank 0
alone computes and caches the teacher's top-k): same curves as one process, and one set of files.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignloop.train import dist

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "sft_tiny.toml"
RECIPES = {"sft": TINY_RECIPE, "dpo": REPO / "recipes" / "dpo_tiny.toml",
           "distill": REPO / "recipes" / "distill_tiny.toml"}

pytestmark = pytest.mark.skipif(not dist.available(), reason="torch.distributed with gloo is unavailable")

LOSS_RTOL = 1e-5  # per-step training loss and eval loss, fp32: 2 vs 1 process differ only in sum order
# Final weights after 6 AdamW steps: Adam divides by sqrt(v), so a ~1e-7 gradient difference on a
# near-zero gradient moves a weight by up to ~lr/100; bound it in units of the learning rate.
WEIGHT_ATOL_LR = 0.05

_BASE = ["train.steps=6", "train.max_seq_len=128", "train.save_every=3", "train.eval_every=3",
         "train.bf16=false", "train.device=cpu", "run.name=r"]
_LORA = ["train.lora.r=4", "train.lora.dropout=0", "train.lr=1e-2"]
CASES = {
    # name: (overrides, parallel)
    "ddp-full": (["train.micro_batch=2", "train.grad_accum=2"], "ddp"),
    "ddp-lora-uneven": (["train.micro_batch=1", "train.grad_accum=3", *_LORA], "ddp"),  # rank 1 pads
    "fsdp-full": (["train.micro_batch=2", "train.grad_accum=2"], "fsdp"),
    "fsdp-lora": (["train.micro_batch=1", "train.grad_accum=4", *_LORA], "fsdp"),
}
# The other trainers: name -> (command, overrides, parallel); their stage folder is named after the command.
OTHER_CASES = {
    "dpo-fsdp-lora": ("dpo", ["train.micro_batch=1", "train.grad_accum=2", *_LORA], "fsdp"),
    "distill-ddp": ("distill", ["train.micro_batch=1", "train.grad_accum=2"], "ddp"),
}

# Runs every case through the CLI (`alignloop train sft`), as `torchrun ... -m alignloop.cli` would.
_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from alignloop.cli import app
    root, cases = sys.argv[1], json.loads(sys.argv[2])
    for name, (command, recipe, overrides, parallel) in cases.items():
        sets = [*overrides, f"train.parallel={parallel}", f"run.dir={root}/{name}"]
        app(["train", command, recipe, *[a for s in sets for a in ("--set", s)]], standalone_mode=False)
""")


def _overrides(name: str) -> list[str]:
    overrides, parallel = CASES[name]
    return [*_BASE, *overrides, f"train.parallel={parallel}"]


def _torchrun(tmp_path: Path, cases: dict, nproc: int = 2, timeout: int = 300,
              others: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    sent = {name: ("sft", str(TINY_RECIPE), [*_BASE, *overrides], parallel)
            for name, (overrides, parallel) in cases.items()}
    for name, (command, overrides, parallel) in (others or {}).items():
        sent[name] = (command, str(RECIPES[command]), [*_BASE, *overrides], parallel)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(tmp_path / "multi"), json.dumps(sent)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder of the 2-process runs, folder of the 1-process runs), one stage per case."""
    from alignloop.recipes import load_recipe
    from alignloop.train.config import DistillRecipe, DPORecipe, SFTRecipe
    from alignloop.train.stage import run_distill, run_dpo, run_sft
    from alignloop.train.threads import torch_threads

    tmp = tmp_path_factory.mktemp("dist")
    child = _torchrun(tmp, CASES, others=OTHER_CASES)
    assert child.returncode == 0, (child.stdout[-3000:], child.stderr[-6000:])
    # One thread, as each torchrun process has (OMP_NUM_THREADS=1): the bf16 teacher pass of the
    # distill cases rounds differently with 2 threads, and its cache is compared bit for bit.
    with torch_threads(1):
        for name in CASES:
            run_sft(load_recipe(TINY_RECIPE, SFTRecipe, [*_overrides(name), f"run.dir={tmp / 'single' / name}"]))
        trainers = {"dpo": (DPORecipe, run_dpo), "distill": (DistillRecipe, run_distill)}
        for name, (command, overrides, parallel) in OTHER_CASES.items():
            recipe_class, run = trainers[command]
            run(load_recipe(RECIPES[command], recipe_class, [*_BASE, *overrides, f"train.parallel={parallel}",
                                                             f"run.dir={tmp / 'single' / name}"]))
    return tmp / "multi", tmp / "single"


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_loss_curve(runs, name):
    multi, single = (root / name / "r" / "sft" for root in runs)
    a, b = _metrics(multi), _metrics(single)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for m2, m1 in zip(a, b):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL), (m2["step"], m2["loss"], m1["loss"])
        assert m2["tokens"] == m1["tokens"]  # the same global batch: token counts are summed over ranks
        # Looser: torch's fp32 norm of one 3M-element gradient (the embedding) is itself only good to
        # ~1e-4 relative on CPU, and FSDP2 takes it over two half-size shards.
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-3)
    for step in (2, 5):  # eval every 3 steps (step index 2 and 5 of the list)
        assert a[step]["eval_loss"] == pytest.approx(b[step]["eval_loss"], rel=LOSS_RTOL)

    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["train"]["steps"] == 6
    lr = manifest["config"]["train"]["lr"]
    wa, wb = load_file(multi / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_ATOL_LR * lr, f"final weights differ by {worst:.2e} (lr {lr})"

    # Checkpoints do not depend on the world size: same files, same tensors (gathered shards).
    ca, cb = multi / "checkpoints" / "step-000003", single / "checkpoints" / "step-000003"
    for f in ("trainable.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(ca / f), load_file(cb / f)
        assert ta.keys() == tb.keys() and all(ta[k].shape == tb[k].shape for k in ta)
    assert "rank1.torch_cpu" in load_file(ca / "rng.safetensors")  # every process's RNG state is kept


@pytest.mark.parametrize("name", list(OTHER_CASES))
def test_dpo_and_distill_under_torchrun_write_once_and_match_one_process(runs, name):
    from alignloop.train.distill import TOPK_FILE
    from alignloop.train.dpo import REFERENCE_FILE

    command = OTHER_CASES[name][0]
    multi, single = (root / name / "r" / command for root in runs)
    a, b = _metrics(multi), _metrics(single)
    # One metrics file, written by rank 0 alone: each step once.
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for m2, m1 in zip(a, b):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=LOSS_RTOL), (m2["step"], m2["loss"], m1["loss"])
        assert m2["tokens"] == m1["tokens"]
    evals = [(m2["eval_loss"], m1["eval_loss"]) for m2, m1 in zip(a, b) if "eval_loss" in m1]
    assert evals and all(x == pytest.approx(y, rel=LOSS_RTOL) for x, y in evals)
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["train"]["steps"] == 6
    cache = {"dpo": REFERENCE_FILE, "distill": TOPK_FILE}[command]
    assert cache in manifest["outputs"]
    # Rank 0's cache holds what one process computes (rank 1 read it, it did not write its own).
    ca, cb = load_file(multi / cache), load_file(single / cache)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    assert not [p.name for p in multi.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    if command == "dpo":  # the FSDP2-sharded LoRA model was gathered, merged and saved by rank 0
        wa, wb = load_file(multi / "model" / "model.safetensors"), load_file(single / "model" / "model.safetensors")
        lr = manifest["config"]["train"]["lr"]
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= WEIGHT_ATOL_LR * lr


def test_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Steps 1-3 on 2 FSDP2 processes, 4-6 on one: the single-process run's results."""
    from alignloop.recipes import load_recipe, recipe_to_dict
    from alignloop.runs import Stage
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    multi, single = (root / "fsdp-lora" / "r" / "sft" for root in runs)
    target = tmp_path / "resume" / "r" / "sft" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(multi / "checkpoints" / "step-000003", target / "step-000003")
    recipe = load_recipe(TINY_RECIPE, SFTRecipe, [*_overrides("fsdp-lora"), f"run.dir={tmp_path / 'resume'}"])
    # The recipe differs only in run.dir, which the config hash covers: re-stamp the copied checkpoint.
    state_file = target / "step-000003" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config_hash"] = Stage(recipe.run.dir, "r", "sft", recipe_to_dict(recipe), [recipe.data.path]).work_hash()
    state_file.write_text(json.dumps(state))
    stage = run_sft(recipe)
    manifest = json.loads(stage.path("manifest.json").read_text())
    assert manifest["train"]["resumed_from"] == 3
    resumed = {m["step"]: m["loss"] for m in _metrics(stage.dir)}
    for m in _metrics(single):
        if m["step"] > 3:
            assert resumed[m["step"]] == pytest.approx(m["loss"], rel=LOSS_RTOL)


def test_helpers_are_no_ops_in_one_process():
    ctx = dist.init_from_env() if not dist.launched_by_torchrun() else dist.context()
    assert ctx.world == 1 and ctx.is_main and not ctx.enabled
    net = torch.nn.Linear(2, 2)
    assert dist.wrap(net, "fsdp") is net
    assert dist.my_share(5) == [0, 1, 2, 3, 4] and dist.passes_per_process(5) == 5
    assert dist.reduce_sums(3.0, {"a": 1.0}) == (3.0, {"a": 1.0})
    assert dist.broadcast_object("x") == "x"
    assert dist.my_share(5, dist.Context(rank=1, world=2)) == [1, 3]
    assert dist.passes_per_process(5, dist.Context(rank=1, world=2)) == 3
    assert dist.warn_uneven(3, dist.Context(rank=0, world=2)) is not None
    assert dist.warn_uneven(4, dist.Context(rank=0, world=2)) is None


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2
                         and torch.distributed.is_nccl_available()), reason="needs 2 CUDA GPUs and NCCL")
def test_two_gpus_nccl_ddp_matches_one(tmp_path):
    from alignloop.recipes import load_recipe
    from alignloop.train.config import SFTRecipe
    from alignloop.train.stage import run_sft

    gpu = ["train.device=cuda"]
    case = {"ddp-full": ([*CASES["ddp-full"][0], *gpu], "ddp")}
    child = _torchrun(tmp_path, case)
    assert child.returncode == 0, child.stderr[-6000:]
    single = run_sft(load_recipe(TINY_RECIPE, SFTRecipe, [*_overrides("ddp-full"), *gpu,
                                                          f"run.dir={tmp_path / 'single' / 'ddp-full'}"]))
    a = _metrics(tmp_path / "multi" / "ddp-full" / "r" / "sft")
    b = _metrics(single.dir)
    for m2, m1 in zip(a, b):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4)  # GPU kernels: looser than CPU fp32
