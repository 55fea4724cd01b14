"""The Ray Data engine gives the same filtered tables and datasets as the Polars path (issue 4,
part 6): same files, same rows in the same order, on a small simulated world with a local Ray."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("ray.data")

from alignloop.data.builders import BuildConfig
from alignloop.data.filters import FilterConfig, make_filters, run_filters
from alignloop.data.ray_engine import plan_passes, run_pipeline

WORLD = {"seed": 2, "users": 250, "days": 5, "bot_fraction": 0.05, "skimmer_fraction": 0.1}


def _config() -> FilterConfig:
    # Repeats before bots and tight shares, so that both global filters drop conversations and the
    # plan has three passes: [quality | repeats], [bots | diversity], [min_reading, user_cap].
    config = FilterConfig(order=["quality", "repeats", "bots", "diversity", "min_reading", "user_cap"])
    config.diversity.max_character_share = 0.15
    config.diversity.max_topic_share = 0.25
    config.user_cap.max_conversations = 6
    config.user_cap.mode = "weight"
    return config


def _files(folder: Path) -> dict[str, pl.DataFrame]:
    return {str(p.relative_to(folder)): pl.read_parquet(p) for p in sorted(folder.rglob("*.parquet"))}


def _sorted(df: pl.DataFrame) -> pl.DataFrame:
    key = next(c for c in ("example_id", "event_id", "turn_id", "conversation_id", "session_id", "user_id")
               if c in df.columns)
    return df.sort(key)


@pytest.fixture(scope="module", autouse=True)
def one_ray():
    """One local Ray for the module: every engine call finds it running (starting Ray takes seconds)."""
    from alignloop.data.ray_engine import ray_session

    with ray_session():
        yield


@pytest.fixture(scope="module")
def logs():
    from alignloop.sim import SimConfig, simulate

    return simulate(SimConfig(**WORLD))[0]


def test_plan_matches_the_polars_passes():
    names = [([f.name for f in a], [f.name for f in b]) for a, b in plan_passes(make_filters(_config()))]
    assert names == [(["quality"], ["repeats"]), (["bots"], ["diversity"]), (["min_reading", "user_cap"], [])]
    default = [([f.name for f in a], [f.name for f in b]) for a, b in plan_passes(make_filters(FilterConfig()))]
    assert default == [(["quality", "bots", "min_reading"], ["repeats", "diversity"]), (["user_cap"], [])]


def test_ray_and_polars_give_identical_outputs(logs, tmp_path):
    from alignloop.data.io import write_logs

    write_logs(tmp_path / "logs", logs)
    config, build = _config(), BuildConfig()
    polars = run_pipeline(tmp_path / "logs", tmp_path / "polars", config, build, engine="polars", partitions=3)
    ray = run_pipeline(tmp_path / "logs", tmp_path / "ray", config, build, engine="ray", partitions=3)

    # The global filters really dropped something (the test exercises the global step).
    dropped = {f.name: f.dropped for f in polars.funnel.filters}
    assert dropped["repeats"] > 0 and dropped["diversity"] > 0 and dropped["bots"] > 0
    a, b = _files(polars.tables.parent), _files(ray.tables.parent)
    assert sorted(a) == sorted(b)
    assert {"tables/turns.parquet", "tables/weights.parquet", "datasets/sft.parquet", "datasets/dpo.parquet",
            "datasets/distill.parquet", "datasets/rm/thumbs/train.parquet"} <= set(a)
    for name in a:
        assert a[name].height > 0 or name.startswith("datasets/rm/"), name
        assert a[name].equals(b[name]), f"{name} differs between the engines"  # same rows, same order

    # Same funnel and build report.
    for f, g in zip(polars.funnel.filters, ray.funnel.filters, strict=True):
        assert (f.name, f.input, f.kept, f.dropped, f.weighted, f.reasons, f.rows_after) == \
               (g.name, g.input, g.kept, g.dropped, g.weighted, g.reasons, g.rows_after)
    assert polars.funnel.dropped.sort("filter", "id").equals(ray.funnel.dropped.sort("filter", "id"))
    assert polars.build.datasets == ray.build.datasets and polars.build.skipped == ray.build.skipped

    # And the same rows as the in-memory Polars run, after a deterministic sort.
    memory, _ = run_filters(logs, config)
    for name, df in memory.items():
        assert _sorted(df).equals(_sorted(b[f"tables/{name}.parquet"])), name


def test_cli_engine_ray_matches_polars(tmp_path):
    """`alignloop logs filter/build --engine ray` writes the same files as the default engine."""
    from typer.testing import CliRunner

    from alignloop.cli import app
    from alignloop.data.io import write_logs
    from alignloop.errors import AlignloopError

    small = simulate_small()
    runner = CliRunner()
    recipe = Path(__file__).parents[1] / "recipes" / "logs.toml"
    for engine in ("polars", "ray"):
        # The same logs in both runs' simulate/ folders (no ground truth: this compares engines only).
        write_logs(tmp_path / engine / "simulate" / "logs", small)
        for command in ("filter", "build"):
            result = runner.invoke(app, ["logs", command, str(recipe), "--run", engine, "--engine", engine,
                                         "--set", f"run.dir={tmp_path}", "--set", "filter.partitions=2"])
            assert result.exit_code == 0, result.output
    for stage in ("filter/tables", "build"):
        a, b = _files(tmp_path / "polars" / stage), _files(tmp_path / "ray" / stage)
        assert sorted(a) == sorted(b) and len(a) > 5
        for name in a:
            assert a[name].equals(b[name]), f"{stage}/{name} differs between the engines"
    manifest = (tmp_path / "ray" / "build" / "manifest.json").read_text()
    assert '"engine": "ray"' in manifest
    bad = runner.invoke(app, ["logs", "filter", str(recipe), "--run", "polars", "--engine", "spark",
                              "--set", f"run.dir={tmp_path}"])
    assert isinstance(bad.exception, AlignloopError) and "--engine must be one of" in str(bad.exception)


def simulate_small():
    from alignloop.sim import SimConfig, simulate

    return simulate(SimConfig(seed=3, users=120, days=3, bot_fraction=0.05, skimmer_fraction=0.1))[0]
