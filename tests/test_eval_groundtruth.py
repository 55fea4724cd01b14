"""Ground-truth scoring, held-out users, and the `eval groundtruth` stage on tiny models."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ConfigDict

from alignloop.errors import AlignloopError
from alignloop.eval.groundtruth import score_texts
from alignloop.eval.heldout import (
    UsersSection,
    check_disjoint,
    heldout_prompts,
    user_ids_in,
)
from alignloop.sim import engagement as eg
from alignloop.sim.lexicon import TOPIC_NAMES

REPO = Path(__file__).resolve().parents[1]


def _taste(n: int, pref_len: float = 6.0, question: float = 0.5, food: float = 1.0) -> eg.Taste:
    topics = np.zeros((n, len(TOPIC_NAMES)))
    topics[:, TOPIC_NAMES.index("food")] = food
    return eg.Taste(pref_len=np.full(n, pref_len), question=np.full(n, question), emoji=np.zeros(n),
                    gesture=np.zeros(n), topics=topics)


def test_scores_are_the_ground_truth_formula_on_fixed_texts():
    texts = ["I love pizza. What about pasta?",      # 6 words, a question, both user words... and topic
             "You are stupid. You are stupid.",      # a repeated sentence, two unsafe words
             "I love pizza."]                        # said before in the conversation
    user = ["Tell me about pizza."] * 3
    s = score_texts(texts, user, _taste(3), histories=[[], [], ["I love pizza."]])
    # length fit 1 (6 words, prefers 6) x 2.0, question 0.5, relevance 1 x 1.5, food words 2/2 x 1.0, bias -2
    assert s.engagement[0] == pytest.approx(2.0 + 0.5 + 1.5 + 1.0 - 2.0)
    # length fit 1 x 2.0, repeat within 0.5 x 2.0, unsafe min(2, 2) x 3.0, bias -2
    assert s.engagement[1] == pytest.approx(2.0 - 1.0 - 6.0 - 2.0)
    # 3 words vs 6: fit exp(-(ln(4/7))^2 / (2 x 0.25)); relevance 1; one food word: 1/2; all repeated: -2.5
    fit = math.exp(-0.5 * (math.log(4 / 7) / 0.5) ** 2)
    assert s.engagement[2] == pytest.approx(2.0 * fit + 1.5 + 0.5 - 2.5 - 2.0)
    assert s.quality == pytest.approx(1 / (1 + np.exp(-s.engagement)))
    assert s.feature_means()["words"] == pytest.approx(5.0)


def test_scores_follow_the_users_taste():
    text = ["Here is a question for you about soup?"]
    likes = score_texts(text, ["hi"], _taste(1, question=1.0)).engagement[0]
    hates = score_texts(text, ["hi"], _taste(1, question=-1.0)).engagement[0]
    assert likes - hates == pytest.approx(2.0)
    with pytest.raises(ValueError):
        score_texts(text * 2, ["hi"], _taste(1))


def test_heldout_prompts_are_deterministic_and_leak_taste():
    a = heldout_prompts(UsersSection(seed=3, users=300))
    b = heldout_prompts(UsersSection(seed=3, users=300))
    c = heldout_prompts(UsersSection(seed=4, users=300))
    assert a.messages == b.messages and a.user_ids == b.user_ids
    assert not set(a.user_ids) & set(c.user_ids)
    assert len(a) == a.n_users == 300
    assert all(m[0]["role"] == "system" and m[1]["role"] == "user" for m in a.messages)
    # users who like questions ask more of them (what lets a model personalise)
    asks = np.array(["?" in t for t in a.user_texts])
    likes = a.taste.question > 0.3
    assert asks[likes].mean() > asks[~likes].mean() + 0.2
    two = heldout_prompts(UsersSection(seed=3, users=5, prompts_per_user=2))
    assert len(two) == 10 and two.n_users == 5 and two.user_rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_heldout_users_are_disjoint_from_training_users(tmp_path, small_world):
    from alignloop.data.io import write_logs

    logs, _ = small_world
    write_logs(tmp_path / "logs", logs)
    prompts = heldout_prompts(UsersSection(seed=7, users=400))  # the world's own seed: still fresh users
    assert check_disjoint(prompts.user_ids, [tmp_path / "logs"]) == logs["users"].num_rows
    assert user_ids_in(tmp_path / "logs") == set(logs["users"].column("user_id").to_pylist())
    # a dataset that trained on one of them is caught
    leaked = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"user_id": ["someone", prompts.user_ids[5]]}), leaked)
    with pytest.raises(AlignloopError, match="not held out"):
        check_disjoint(prompts.user_ids, [tmp_path / "logs", leaked])
    with pytest.raises(AlignloopError, match="not found"):
        check_disjoint(prompts.user_ids, [tmp_path / "missing.parquet"])


def test_eval_recipe_validates(tmp_path):
    from alignloop.eval.config import GroundTruthRecipe
    from alignloop.recipes import load_recipe

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    recipe = load_recipe(REPO / "recipes/eval_sim.toml", GroundTruthRecipe, [f"pairs.path={pairs}"])
    assert list(recipe.models) == ["base", "sft", "dpo"] and recipe.baseline_label == "base"
    assert recipe.users.exclude and recipe.pairs.exclude  # both check that their users trained nothing
    # held-out users must not come from the training world's seed
    train_seed = load_recipe(REPO / "recipes/logs_sim.toml", _Seed).simulate.seed
    pair_seed = load_recipe(REPO / "recipes/heldout_sim.toml", _Seed).simulate.seed
    assert len({train_seed, pair_seed, recipe.users.seed}) == 3
    with pytest.raises(AlignloopError, match="unknown key 'users.user'"):
        load_recipe(REPO / "recipes/eval_sim.toml", GroundTruthRecipe, [f"pairs.path={pairs}", "users.user=3"])
    for bad in ("pairs.start.dpo=nope", "pairs.start.nope=sft", "pairs.start.sft=sft"):
        with pytest.raises(AlignloopError, match="pairs.start"):
            load_recipe(REPO / "recipes/eval_sim.toml", GroundTruthRecipe, [f"pairs.path={pairs}", bad])
    off = load_recipe(REPO / "recipes/eval_sim.toml", GroundTruthRecipe, [f"pairs.path={pairs}", "pairs=false"])
    assert off.pairs is None
    with pytest.raises(AlignloopError, match="baseline"):
        load_recipe(REPO / "recipes/eval_sim.toml", GroundTruthRecipe, [f"pairs.path={pairs}", "baseline=nope"])



class _Seed(BaseModel):
    model_config = ConfigDict(extra="allow")

    class _Sim(BaseModel):
        model_config = ConfigDict(extra="allow")
        seed: int

    simulate: _Sim


def _pairs_file(path: Path, users: list[str]) -> Path:
    rows = []
    for i, user in enumerate(users):
        prompt = [{"role": "system", "content": "You are Ava."}, {"role": "user", "content": f"Tell me about pizza {i}."}]
        rows.append({"prompt": prompt, "user_id": user,
                     "chosen": [{"role": "assistant", "content": f"Pizza is great, {i}! What do you like on it?"}],
                     "rejected": [{"role": "assistant", "content": "I do not know."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_groundtruth_stage_on_tiny_models(tmp_path, capsys):
    from alignloop.eval.config import GroundTruthRecipe
    from alignloop.eval.stage import run_groundtruth
    from alignloop.engine.config import SamplingSection

    pairs = _pairs_file(tmp_path / "pairs.jsonl", ["ua", "ub", "uc", "ua"])
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"user_id": "someone-else"}) + "\n")
    recipe = GroundTruthRecipe(
        run={"name": "t", "dir": str(tmp_path / "runs")},
        models={"a": "tiny", "b": "tiny-qwen2"},
        users=UsersSection(seed=11, users=6, exclude=[str(train)]),
        sampling=SamplingSection(temperature=1.0, max_tokens=6, seed=5),
        pairs={"path": pairs, "reference": "tiny", "max_seq_len": 128, "exclude": [str(train)],
               "start": {"b": "a"}},
    )
    result = run_groundtruth(recipe)
    stage = tmp_path / "runs/t/eval-groundtruth"
    saved = json.loads((stage / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["prompts"] == 6 and result["users"] == 6

    # the reported means are the ground truth of the saved answers
    prompts = heldout_prompts(recipe.users)
    for label in ("a", "b"):
        lines = (stage / f"responses/{label}.jsonl").read_text().splitlines()[1:]
        texts = [json.loads(line)["text"] for line in lines]
        assert len(texts) == 6
        truth = score_texts(texts, prompts.user_texts, prompts.taste)
        assert result["models"][label]["engagement"]["mean"] == pytest.approx(truth.engagement.mean())
    b_vs_a = result["comparisons"]["b"]["engagement"]
    assert b_vs_a["diff_mean"] == pytest.approx(result["models"]["b"]["engagement"]["mean"]
                                                - result["models"]["a"]["engagement"]["mean"])
    assert 0.0 <= b_vs_a["p_value"] <= 1.0

    # pairs: the reference against itself is exactly a coin flip; the tiny-qwen2 model is not the reference
    p = result["pairs"]
    assert p["pairs"] == 4 and p["users"] == 3
    assert p["models"]["a"]["accuracy"] == 0.5 and p["models"]["a"]["margin"] == 0.0
    assert p["models"]["a"]["logp_accuracy"] == p["reference_logp_accuracy"]
    # b scored against its start a (= the reference here): the same as against the reference, and
    # compared pair by pair with a's own score against its start (the reference: all ties, 0.5)
    v = p["models"]["b"]["vs_start"]
    assert v["start"] == "a" and v["accuracy"] == pytest.approx(p["models"]["b"]["accuracy"])
    assert v["lo"] <= v["accuracy"] <= v["hi"]
    assert v["compared"]["diff_mean"] == pytest.approx(v["accuracy"] - 0.5)
    assert "vs_start" not in p["models"]["a"]
    out = capsys.readouterr().out
    assert "b vs a: engagement" in out and "held-out pair accuracy" in out
    assert "held-out pair accuracy of b vs its start a" in out

    # a second run is skipped; a leaked pair user is refused
    assert run_groundtruth(recipe) == saved
    leaked = tmp_path / "leak.jsonl"
    leaked.write_text(json.dumps({"user_id": "ub"}) + "\n")
    recipe.pairs.exclude = [str(leaked)]
    with pytest.raises(AlignloopError, match="held-out pair users"):
        run_groundtruth(recipe, force=True)


def test_missing_model_folder_is_one_line_error(tmp_path):
    from alignloop.eval.config import GroundTruthRecipe
    from alignloop.eval.stage import run_groundtruth

    recipe = GroundTruthRecipe(run={"name": "t", "dir": str(tmp_path)}, models={"sft": "runs/nowhere/sft/model"})
    with pytest.raises(AlignloopError, match="models.sft: no model folder"):
        run_groundtruth(recipe)
