"""End to end on a small simulated world: rm train -> rm eval -> reward fit-weights -> RewardFn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from alignloop.errors import AlignloopError
from alignloop.recipes import load_recipe
from alignloop.rewards.config import RMRecipe

ROOT = Path(__file__).parents[1]
REWARDS = ROOT / "src" / "alignloop" / "rewards"


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    from alignloop.data.config import LogsRecipe
    from alignloop.data.stage import run_build_stage, run_filter_stage
    from alignloop.sim.config import SimulateRecipe
    from alignloop.sim.stage import run_simulate

    tmp = tmp_path_factory.mktemp("rmlogs")
    recipe = load_recipe(ROOT / "recipes" / "logs.toml", LogsRecipe, [
        f"run.dir={tmp}", "run.name=logs", "simulate.users=120", "simulate.days=10"])
    run_simulate(SimulateRecipe.model_validate(
        {"run": recipe.run.model_dump(), "simulate": recipe.simulate, "output": recipe.output}))
    run_filter_stage(recipe)
    return run_build_stage(recipe).dir


@pytest.fixture(scope="module")
def trained(build_dir, tmp_path_factory):
    from alignloop.rewards.stage import run_fit_weights, run_rm_eval, run_rm_train

    runs = tmp_path_factory.mktemp("rmruns")
    recipe = load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe, [f"run.dir={runs}", f"data.build={build_dir}"])
    train = run_rm_train(recipe)
    evaluation = run_rm_eval(recipe)
    weights = run_fit_weights(recipe)
    return recipe, train, evaluation, weights


def test_stages_write_their_outputs(trained, capsys):
    from alignloop.rewards.stage import run_rm_train

    recipe, train, evaluation, weights = trained
    for f in ("heads.safetensors", "heads.json", "combine.json", "manifest.json", "metrics.jsonl"):
        assert (train.dir / f).is_file(), f
    assert list((train.dir / "embeddings").glob("emb-*.npz"))
    report = json.loads((evaluation.dir / "eval.json").read_text())
    assert set(report) == set(recipe.data.heads)
    for h, r in report.items():
        assert r["primary"]["value"] is not None, h
        assert "ceiling" in r and "shortcut" in r, h  # simulated logs: the truth is there
        assert set(r["shortcut"]) == {"text only", "text+activity", "activity only"}, h
        assert r["shortcut"]["text only"] == r["primary"]["value"], h  # the served heads read text only
    assert 0 <= report["continue"]["accuracy"] <= 1 and report["continue"]["ceiling"]["accuracy"] > 0.5
    assert (evaluation.dir / "rm_metrics.png").stat().st_size > 1000
    w = json.loads((weights.dir / "weights.json").read_text())
    assert set(w["learned"]) == {h for h in recipe.data.heads if h != "safety"}
    assert w["heldout_auc"]["learned"] is not None
    assert w["served"] in ("learned", "equal") and w["weights"] == w[w["served"]]
    for h in ("continue", "thumbs", "returned_7d"):
        r = report[h]
        assert {"positive_rate", "baseline_accuracy", "balanced_accuracy", "auc"} <= set(r), h
    assert run_rm_train(recipe).is_complete()  # unchanged inputs: skipped


def test_heads_with_user_activity_serve_eval_and_fit_weights_with_it(build_dir, tmp_path, capsys):
    from alignloop.rewards.stage import run_fit_weights, run_rm_eval, run_rm_train

    recipe = load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe, [
        f"run.dir={tmp_path}", f"data.build={build_dir}", "train.user_activity=true",
        'data.heads=["continue", "returned_1d"]', 'combine.weights={"continue" = 1.0, "returned_1d" = 1.0}',
        "combine.kpi=returned_1d", "combine.safety=none"])
    run_rm_train(recipe)
    evaluation = run_rm_eval(recipe)
    report = json.loads((evaluation.dir / "eval.json").read_text())
    for h, r in report.items():
        assert r["shortcut"]["text+activity"] == r["primary"]["value"], h  # served = text+activity
    out = capsys.readouterr().out
    assert "served (text+activity)" in out and "share surviving without activity" in out
    w = json.loads((run_fit_weights(recipe).dir / "weights.json").read_text())
    assert set(w["learned"]) == {"continue", "returned_1d"} and w["heldout_auc"]["learned"] is not None
    # A reward for RL scores text alone: the activity-aware heads are for evaluation and KPI fits.
    from alignloop.rewards.serve import load_reward_fn

    with pytest.raises(AlignloopError, match="text alone"):
        load_reward_fn(tmp_path / recipe.run.name / "rm")


def test_reward_fn_scores_a_batch(trained):
    from alignloop.rewards.serve import load_reward_fn

    recipe, train, _, _ = trained
    fn = load_reward_fn(train.dir)
    contexts = [[{"role": "system", "content": "You are a chef."}, {"role": "user", "content": "I love ramen"}]] * 3
    batch = fn(contexts, ["Ramen is great! What broth do you like?", "ok", "I hate you, stupid idiot"])
    assert batch.reward.shape == (3,) and np.isfinite(batch.reward).all()
    assert {"raw/continue", "raw/safety", "continue", "p_unsafe"} <= set(batch.components)
    assert (batch.reward[batch.unsafe] == -recipe.combine.hard_penalty).all()
    learned = load_reward_fn(train.dir, weights="learned")
    assert learned(contexts[:1], ["hi"]).reward.shape == (1,)
    with pytest.raises(AlignloopError, match="not found"):
        load_reward_fn(train.dir, weights=str(train.dir / "nope.json"))


def test_eval_split_sharing_users_is_an_error(build_dir, tmp_path):
    import shutil

    from alignloop.rewards.stage import run_rm_train

    bad = tmp_path / "build"
    shutil.copytree(build_dir / "rm", bad / "rm")
    shutil.copy(bad / "rm" / "continue" / "train.parquet", bad / "rm" / "continue" / "eval.parquet")
    recipe = load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe,
                         [f"run.dir={tmp_path}", f"data.build={bad}", 'data.heads=["continue"]', "combine.safety=none"])
    with pytest.raises(AlignloopError, match="in both train and eval"):
        run_rm_train(recipe)


def test_lm_backbone_same_interface(build_dir, tmp_path):
    from alignloop.rewards.backbones import make_backbone
    from alignloop.rewards.data import load_head
    from alignloop.rewards.model import RewardModel
    from alignloop.train.threads import torch_threads

    recipe = load_recipe(ROOT / "recipes" / "rm_tiny.toml", RMRecipe, [
        f"data.build={build_dir}", "backbone.kind=lm", "backbone.model=tiny", "backbone.max_length=32",
        "train.steps=2", "train.batch_size=4", "train.backbone_lr=0.01", 'data.heads=["preference", "time_to_next"]',
        "combine.safety=none"])
    sets = {h: load_head(recipe.data, h, "train", 12) for h in recipe.data.heads}
    model = RewardModel(make_backbone(recipe.backbone, seed=0), recipe.data.heads, recipe.train)
    before = model.backbone.state()
    with torch_threads(1):
        model.fit(sets)
    after = model.backbone.state()
    assert any(not np.allclose(before[k], after[k]) for k in before)  # LoRA adapters trained
    model.save(tmp_path)
    again = RewardModel.load(tmp_path)
    ctx, resp = sets["time_to_next"].contexts[:4], sets["time_to_next"].responses[:4]
    a, b = model.score(ctx, resp), again.score(ctx, resp)
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_training_code_never_reads_ground_truth():
    # Only the evaluation module may touch the simulator's truth; the eval stage imports it lazily.
    allowed = {"ceiling.py", "stage.py", "config.py"}
    for path in REWARDS.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"alignloop\.(rl|eval|flywheel)\b", text), path.name
        if path.name not in allowed:
            assert "ground_truth" not in text and "rewards.ceiling" not in text, path.name
    stages = (REWARDS / "stage.py").read_text()
    assert stages.count("from alignloop.rewards.ceiling import") == 1
    assert "def run_rm_eval" in stages.split("from alignloop.rewards.ceiling import")[0]
