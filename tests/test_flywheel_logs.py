"""The flywheel on real logs (`[logs] source = "ingest"`): a chat product's export in, no simulator
anywhere. It ingests, trains on the train users and evaluates base, SFT and RL on the held-out users'
prompts, and the report says there was no A/B test and no ground truth, and what it measured instead."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from alignloop.data.builders import split_of
from alignloop.errors import AlignloopError
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.stage import planned_stages, run_flywheel
from alignloop.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CHITCHAT = ROOT / "recipes" / "chitchat.toml"

CHARACTERS = ["You are a cheerful barista.", "You are a retired sea captain.", "You are a patient chess coach.",
              "You are a travel guide in Lisbon.", "You are a gardener who loves roses."]
OPENERS = ["hi there, how is your day going", "can you tell me something fun", "what should I try first",
           "I had a rough week honestly", "do you have a favourite story", "ok so where do I start"]
ANSWERS = ["Pretty good, thanks for asking! What brings you here today?", "Sure. Once I saw a whale at dawn.",
           "Start small and see what you like.", "I am sorry to hear that. Want to talk about it?",
           "Yes, the one about the lost anchor!", "Right at the beginning, with a cup of tea."]
FOLLOWUPS = ["nice", "tell me more about that", "haha ok", "why is that", "and then what happened", "cool thanks"]


def _export(path: Path, users: int = 36) -> Path:
    """An OpenAI-format export of a small chat product: each user has 2-3 conversations a few days
    (or one day) apart, 2-4 exchanges each, with thumbs on some answers. Users are 'acct-N'."""
    start = datetime(2026, 3, 2, 9, tzinfo=UTC)
    lines = []
    for u in range(users):
        gap = timedelta(days=1 if u % 2 else 4, hours=u % 5)
        for c in range(2 + u % 2):
            t = start + c * gap + timedelta(minutes=13 * u)
            messages = [{"role": "system", "content": CHARACTERS[(u + c) % len(CHARACTERS)]}]
            for i in range(2 + (u + c) % 3):
                pool = OPENERS if i == 0 else FOLLOWUPS
                asked = t + timedelta(seconds=60 * i + 7 * (u % 4))
                messages.append({"role": "user", "content": f"{pool[(u + 2 * c + i) % len(pool)]} ({u}.{c}.{i})",
                                 "timestamp": asked.isoformat()})
                answer = {"role": "assistant", "content": ANSWERS[(u * 5 + c + i) % len(ANSWERS)],
                          "timestamp": (asked + timedelta(seconds=3)).isoformat()}
                if (u + i) % 3 == 0:
                    answer["feedback"] = {"rating": 1 if (u * 7 + c + i) % 4 else -1}
                messages.append(answer)
            lines.append({"id": f"conv-{u}-{c}", "user_id": f"acct-{u}", "created_at": t.isoformat(),
                          "model": "prod-bot-v2", "messages": messages})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _recipe(tmp_path: Path, export: Path, *overrides: str) -> FlywheelRecipe:
    """recipes/chitchat.toml cut to a tiny model and a few steps, reading `export` instead of chitchat."""
    return load_recipe(CHITCHAT, FlywheelRecipe, [
        f"run.dir={tmp_path / 'runs'}", "flywheel.base_model=tiny", "logs.chitchat=false",
        f'logs.inputs=["{export}"]', "logs.format=openai", "build.rm.eval_fraction=0.3",
        "sft.train.steps=2", "sft.train.save_every=1", "sft.train.bf16=false", "sft.train.lora.r=4",
        "sft.train.lora.alpha=8", 'rm.heads=["thumbs", "continue", "returned_1d"]',
        'rm.combine.weights={"thumbs" = 1.0, "continue" = 1.0, "returned_1d" = 1.0}', "rm.max_train_rows=150",
        "rm.max_eval_rows=100", "rm.backbone.max_length=32", "rm.train.hidden=16", "rm.train.steps=20",
        "rm.train.eval_every=10", "rm.eval.plot=false", "rl.sampling.max_tokens=8", "rl.rl.steps=2",
        "rl.rl.prompts_per_step=2", "rl.rl.group=4", "rl.rl.micro_batch=8", "rl.rl.bf16=false",
        "rl.rl.save_every=1", "eval.max_prompts=8", "eval.sampling.max_tokens=8", "eval.judge_prompts=1",
        *overrides])


def test_flywheel_on_real_logs_reports_what_it_measured(tmp_path, capsys):
    export = _export(tmp_path / "export.jsonl")
    recipe = _recipe(tmp_path, export)
    assert planned_stages(recipe) == ["ingest", "filter", "build", "sft", "rm", "rl", "eval"]
    state = run_flywheel(recipe, run="real")
    printed = capsys.readouterr()
    out = printed.out + printed.err
    folder = tmp_path / "runs" / "real"
    turn = state["turns"][0]
    s = turn["summaries"]

    assert s["ingest"]["counts"]["conversations"]["ingested"] == 90
    assert not (folder / "turn-1" / "simulate").exists() and not (folder / "turn-1" / "abtest").exists()
    # Trained on train users only: the SFT set, RL prompts and reward-model train sets hold no held-out user.
    build = folder / "turn-1" / "build"
    sft = pl.read_parquet(build / "sft.train-users.parquet")
    assert sft.height and (split_of(sft["user_id"], 0.3, "rm-split") == "train").all()
    assert pl.read_parquet(build / "sft.parquet").height > sft.height
    # RL ran against the learned reward on the built prompts, with no ground-truth watch.
    assert json.loads((folder / "turn-1" / "rl-grpo" / "manifest.json").read_text())["reward_hacking"] is None
    assert s["rl"]["prompts"].endswith("build/rl/train.jsonl") and s["rl"]["reward_hacking"] == {}

    e = s["eval"]
    assert e["kind"] == "logs" and list(e["models"]) == ["base", "sft", "rl"]
    assert e["models"]["rl"] == turn["model"] and e["models"]["base"] == "tiny"
    assert 0 < e["prompts"] <= 8 and e["training_users_checked"] > 0 and e["training_sets_checked"] >= 3
    held = set(pl.read_ndjson(build / "rl" / "eval.jsonl")["user_id"])
    assert (split_of(pl.Series(sorted(held)), 0.3, "rm-split") == "eval").all()
    for name in ("base", "sft", "rl"):
        r = e[name]["reward"]
        assert r["lo"] <= r["mean"] <= r["hi"] and set(r["components"]) >= {"raw/thumbs", "raw/continue"}
        assert e[name]["rules"]["n"] == e["prompts"] and "message" in e[name]["judge_status"]
    assert set(e["pairs"]) == {"sft_vs_base", "rl_vs_base", "rl_vs_sft"}
    assert all(0 <= d["win_rate"] <= 1 for d in e["pairs"].values())

    # Not launched, and why; the skipped stages named with their reasons.
    assert not turn["launched"] and turn["why"][0].startswith("no A/B test: ")
    assert state["deployed_at_end"] == "tiny"
    assert set(state["not_run"]) == {"simulate", "abtest", "rl ground-truth watch", "eval ground truth"}
    for text in (out, (folder / "report.md").read_text(), (folder / "report.html").read_text()):
        assert "no A/B test and no ground truth for real logs" in text.replace("There is no", "no")
        assert "not run: abtest: no A/B test" in text and "rl ground-truth watch" in text
        assert "learned reward" in text and "rm-eval thumbs" in text
    assert "learned reward (per-user mean, 95% CI): base " in out and "learned reward rl - base: " in out
    assert "judge" in out
    md = (folder / "report.md").read_text()
    assert "offline eval: " in md and "RL: learned reward " in md and "ingested real logs from" in md
    assert "gt_engagement" not in md and "ground-truth engagement" not in md.replace("no ground-truth engagement", "")

    # Unchanged: every stage is skipped on a second run, ingest too (nothing is ingested twice).
    manifests = {p: p.stat().st_mtime_ns for p in folder.glob("turn-1/*/manifest.json")}
    run_flywheel(recipe, run="real")
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests


def test_real_logs_recipe_is_checked_when_it_loads(tmp_path):
    export = tmp_path / "x.jsonl"
    export.write_text("")
    recipe = load_recipe(CHITCHAT, FlywheelRecipe)
    assert recipe.logs.real and recipe.logs.chitchat and recipe.rm.combine.safety == "none"
    assert not {"preference", "safety"} & set(recipe.rm.heads)
    with pytest.raises(AlignloopError, match="flywheel.turns must be 1"):
        load_recipe(CHITCHAT, FlywheelRecipe, ["flywheel.turns=2"])
    with pytest.raises(AlignloopError, match="needs logs.inputs or logs.chitchat"):
        load_recipe(CHITCHAT, FlywheelRecipe, ["logs.chitchat=false"])
    with pytest.raises(AlignloopError, match='read only with logs.source = "ingest"'):
        load_recipe(CHITCHAT, FlywheelRecipe, ["logs.source=simulate"])
    with pytest.raises(AlignloopError, match="logs.bogus"):
        load_recipe(CHITCHAT, FlywheelRecipe, ["logs.bogus=1"])
