"""Dataset builders on a small simulated world: SFT targets are selected candidates, DPO pairs are
siblings, reward-model splits share no user, counts add up, partitions and formats agree."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from alignloop.data.builders import (
    SIGNALS,
    BuildConfig,
    build_datasets,
    build_partition,
)
from alignloop.data.filters import FilterConfig, run_filters

WORLD = {"seed": 2, "users": 250, "days": 5, "bot_fraction": 0.05, "skimmer_fraction": 0.1}


@pytest.fixture(scope="module")
def filtered():
    from alignloop.sim import SimConfig, simulate

    logs, _ = simulate(SimConfig(**WORLD))
    config = FilterConfig()
    config.user_cap.max_conversations = 8
    config.user_cap.mode = "weight"
    out, _ = run_filters(logs, config)
    return out


@pytest.fixture(scope="module")
def built(filtered, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("datasets")
    report = build_datasets(filtered, BuildConfig(formats=["parquet", "jsonl"]), out_dir)
    return out_dir, report


def _read(out_dir, name: str) -> pl.DataFrame:
    return pl.read_parquet(out_dir / f"{name}.parquet")


def _roles_ok(messages: list[dict], last: str) -> bool:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    return body == expected and body[-1] == last


def test_sft_ends_with_a_selected_candidate(filtered, built):
    out_dir, _ = built
    sft = _read(out_dir, "sft")
    assert sft.height > 50
    turns = filtered["turns"].select("turn_id", "text", "selected", "role")
    rows = sft.join(turns, on="turn_id", how="left")
    assert rows["selected"].all() and (rows["role"] == "assistant").all()
    for messages, text in zip(rows["messages"].to_list()[:300], rows["text"].to_list()[:300]):
        assert messages[-1] == {"role": "assistant", "content": text}
        assert _roles_ok(messages, "assistant")
    # System prompt from the conversation; source "swipe": the user settled on it after swiping.
    convs = filtered["conversations"].select("conversation_id", "system_prompt")
    first = sft.join(convs, on="conversation_id").select(
        pl.col("messages").list.first().struct.field("content"), "system_prompt")
    assert (first["content"] == first["system_prompt"]).all()
    selects = set(filtered["events"].filter(pl.col("type") == "select")["turn_id"])
    assert set(sft["turn_id"]) <= selects and (sft["source"] == "swipe").all()
    flagged = set(filtered["target_flags"]["turn_id"])
    assert not flagged & set(sft["turn_id"])


def test_dpo_pairs_are_siblings_of_one_parent(filtered, built):
    out_dir, _ = built
    dpo = _read(out_dir, "dpo")
    assert dpo.height > 50
    turns = filtered["turns"].select("turn_id", "parent_id", "shown", "selected", "text")
    chosen = dpo.join(turns, left_on="chosen_turn_id", right_on="turn_id")
    rejected = dpo.join(turns, left_on="rejected_turn_id", right_on="turn_id")
    assert (chosen["parent_id_right"] == chosen["parent_id"]).all()
    assert (rejected["parent_id_right"] == rejected["parent_id"]).all()
    assert chosen["selected"].all() and rejected["shown"].all() and not rejected["selected"].any()
    parents = dpo.join(turns.select(parent_id="turn_id", parent_text="text"), on="parent_id")
    for prompt, text, c, r in zip(parents["prompt"].to_list()[:300], parents["parent_text"].to_list()[:300],
                                  parents["chosen"].to_list()[:300], parents["rejected"].to_list()[:300]):
        assert prompt[-1] == {"role": "user", "content": text}
        assert _roles_ok(prompt, "user")
        assert len(c) == 1 and len(r) == 1 and c[0]["role"] == r[0]["role"] == "assistant"


def test_rm_splits_share_no_user(built):
    out_dir, _ = built
    eval_users: set[str] = set()
    train_users: set[str] = set()
    for signal in SIGNALS:
        train = _read(out_dir, f"rm/{signal}/train")
        held = _read(out_dir, f"rm/{signal}/eval")
        assert train.height > 0, signal
        assert not set(train["user_id"]) & set(held["user_id"]), signal
        train_users |= set(train["user_id"])
        eval_users |= set(held["user_id"])
    assert eval_users and not train_users & eval_users  # one split per user across every signal


def test_counts_add_up(filtered, built):
    out_dir, report = built
    for name, d in report.datasets.items():
        df = _read(out_dir, name)
        assert df.height == d["rows"], name
        assert df.select(pl.col("user_id").n_unique()).item() == d["users"], name
        lines = (out_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == d["rows"], name
    # SFT: every chosen swipe is an example or a flagged target.
    selects = filtered["events"].filter(pl.col("type") == "select").select("turn_id").unique()
    chosen = filtered["turns"].filter(pl.col("selected")).join(selects, on="turn_id", how="semi")
    assert report.skipped["sft:not_on_a_path"] == 0
    assert report.datasets["sft"]["rows"] + report.skipped["sft:flagged_target"] == chosen.height
    # Outcome sets: every label row is an example, or was censored.
    labels = filtered["labels"]
    n = lambda s: report.datasets[f"rm/{s}/train"]["rows"] + report.datasets[f"rm/{s}/eval"]["rows"]
    assert n("continue") == n("time_to_next") == labels.height
    assert n("returned_7d") + report.skipped.get("rm/returned_7d:censored", 0) == labels.height
    ttn = pl.concat([_read(out_dir, "rm/time_to_next/train"), _read(out_dir, "rm/time_to_next/eval")])
    assert (ttn["censored"] == ttn["label"].is_null()).all() and ttn["censored"].any()
    # Safety: reported answers are the positives.
    reports = filtered["events"].filter(pl.col("type") == "report").select("turn_id").unique()
    safety = pl.concat([_read(out_dir, "rm/safety/train"), _read(out_dir, "rm/safety/eval")])
    assert set(safety.filter(pl.col("label") == 1)["turn_id"]) == set(reports["turn_id"])


def test_notes_say_which_source_and_which_label_cannot_train(built):
    _, report = built
    notes = {n["dataset"]: n for n in report.notes}
    selects = report.facts["select_events"]
    assert notes["sft"] == {"dataset": "sft", "kind": "choice", "line": (
        f"sft: source auto -> swipes — {selects:,} answers were settled on after swiping; only they are targets "
        '(build.sft.source = "selected" takes every selected answer)')}
    # Five days of logs: a 7-day outcome is seen only for users who came back, so it is always 1.
    rows = report.datasets["rm/returned_7d/train"]["rows"] + report.datasets["rm/returned_7d/eval"]["rows"]
    censored = report.skipped["rm/returned_7d:censored"]
    assert notes["rm/returned_7d"]["line"] == (
        f"rm/returned_7d: label constant 1 over {rows:,} rows — only returns are observed: the logs end less than "
        f"7 day(s) after the other {censored:,} answers, whose outcomes are censored; the returned_7d head will "
        "not train")
    assert set(notes) == {"sft", "rm/returned_7d"}  # every other set can train and be evaluated


def test_weights_carry_the_user_cap(filtered, built):
    out_dir, _ = built
    continued = pl.concat([_read(out_dir, "rm/continue/train"), _read(out_dir, "rm/continue/eval")])
    w = continued.join(filtered["weights"].select("conversation_id", cw="weight"), on="conversation_id")
    assert (w["weight"] == w["cw"]).all()
    assert (w["weight"] < 1).any() and (w["weight"] > 0).all()


def test_jsonl_matches_parquet(built):
    out_dir, _ = built
    first = json.loads((out_dir / "dpo.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == _read(out_dir, "dpo").row(0, named=True)


def test_partitions_give_the_same_examples(filtered, built, tmp_path):
    out_dir, report = built
    report3 = build_datasets(filtered, BuildConfig(partitions=3), tmp_path)
    assert {k: v["rows"] for k, v in report3.datasets.items()} == {k: v["rows"] for k, v in report.datasets.items()}
    for name in ("sft", "dpo", "rm/thumbs/train", "distill"):
        a = _read(out_dir, name).sort("example_id")
        b = pl.read_parquet(tmp_path / f"{name}.parquet").sort("example_id")
        assert a.equals(b), name


def test_pieces_built_on_threads_write_the_same_files(filtered, tmp_path):
    """Pieces built side by side on threads are handed to the writer in order: every file holds
    the same rows in the same order as when they are built one after another."""
    config = BuildConfig(events_per_partition=2_000, formats=["parquet", "jsonl"])
    one = build_datasets(filtered, config, tmp_path / "one", workers=1)
    two = build_datasets(filtered, config, tmp_path / "two", workers=2)
    assert one.datasets == two.datasets and one.skipped == two.skipped and one.facts == two.facts
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert len(files) > 20 and files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.*"))
    for f in files:
        if f.suffix == ".parquet":
            assert pl.read_parquet(tmp_path / "one" / f).equals(pl.read_parquet(tmp_path / "two" / f)), f
        else:
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_context_window_and_sources(filtered):
    config = BuildConfig(max_context_messages=3)
    config.sft.source = "selected"
    config.rm.enabled = False
    datasets, _ = build_partition(filtered, config)
    sft = datasets["sft"]
    assert set(sft["source"]) == {"swipe", "selected"}
    lengths = sft["messages"].list.len()
    assert lengths.max() <= 1 + 3 + 1  # system + at most 3 context messages + the target
    for messages in sft["messages"].to_list()[:200]:
        assert _roles_ok(messages, "assistant")
    assert datasets["distill"]["messages"].list.len().max() <= 1 + 3


def test_stages_simulate_filter_build(tmp_path):
    from alignloop.data.config import LogsRecipe
    from alignloop.data.stage import run_build_stage, run_filter_stage
    from alignloop.recipes import load_recipe
    from alignloop.sim.config import SimulateRecipe
    from alignloop.sim.stage import run_simulate

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "logs.toml", LogsRecipe, [
        f"run.dir={tmp_path}", "simulate.users=150", "simulate.days=3", "filter.partitions=2", "build.partitions=1"])
    run_simulate(SimulateRecipe.model_validate(
        {"run": recipe.run.model_dump(), "simulate": recipe.simulate, "output": recipe.output}))
    stage = run_filter_stage(recipe)
    for name in ("funnel.png", "funnel.json", "dropped.parquet", "precision_recall.json", "manifest.json",
                 "tables/partitions.json", "tables/turns.parquet"):
        assert (stage.dir / name).is_file(), name
    funnel = json.loads((stage.dir / "funnel.json").read_text())
    assert funnel["precision_recall"]["bots"]["precision"] is not None
    assert funnel["precision_recall"]["bots"]["target"] == {"precision": 0.9, "recall": 0.8}
    assert isinstance(funnel["precision_recall"]["min_reading"]["meets_target"], bool)
    build = run_build_stage(recipe)
    report = json.loads((build.dir / "build_report.json").read_text())
    assert report["partitions"] == 2 and report["datasets"]["sft"]["rows"] > 0
    assert (build.dir / "rm" / "safety" / "eval.parquet").is_file()
    assert run_filter_stage(recipe).is_complete() and run_build_stage(recipe).is_complete()


def test_commands_register_with_typer():
    import typer
    from typer.testing import CliRunner

    from alignloop.cli.logs import build as build_command, filter_ as filter_command

    app = typer.Typer()
    app.command("filter")(filter_command)
    app.command("build")(build_command)
    runner = CliRunner()
    for name in ("filter", "build"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "recipe" in result.output.lower() and "--set" in result.output
