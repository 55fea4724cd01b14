"""The simulated A/B test: statistics on known inputs, and decisions on worlds with known answers."""

import numpy as np
import pytest
from scipy import stats

from alignloop.eval.abtest import (
    ABSettings,
    arm_world,
    bootstrap_ci,
    sample_ratio_p_value,
    simulate_abtest,
    welch,
)
from alignloop.sim.config import SimConfig, TemplateSection
from alignloop.sim.responder import TemplateResponder


def test_welch_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 50), rng.normal(0.5, 2, 80)
    diff, low, high, p = welch(a, b)
    reference = stats.ttest_ind(b, a, equal_var=False)
    assert diff == pytest.approx(b.mean() - a.mean())
    assert p == pytest.approx(reference.pvalue)
    ci = reference.confidence_interval(0.95)
    assert (low, high) == pytest.approx((ci.low, ci.high))


def test_bootstrap_interval_covers_the_difference_and_shrinks_with_more_users():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.normal(0, 1, 30), rng.normal(1, 1, 30), np.random.default_rng(0))
    large = bootstrap_ci(rng.normal(0, 1, 3000), rng.normal(1, 1, 3000), np.random.default_rng(0))
    assert small[0] < 1 < small[1] and large[0] < 1 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3


def test_sample_ratio_check_flags_a_lopsided_split():
    assert sample_ratio_p_value([500, 510], [1, 1]) > 0.5
    assert sample_ratio_p_value([500, 700], [1, 1]) < 1e-6


def test_arms_get_fresh_users_never_from_the_training_seed():
    world = SimConfig(seed=3, users=10)
    seeds = {world.seed, arm_world(world, 0).seed, arm_world(world, 1).seed}
    assert len(seeds) == 3


WORLD = SimConfig(users=200, days=8, seed=5)


def _arm(name, **style):
    return name, TemplateResponder(TemplateSection(**style), name)


def test_a_better_model_launches_and_an_unsafe_one_is_stopped_by_the_gate():
    control = _arm("base")
    better = simulate_abtest(WORLD, control, _arm("better", question=0.7, repeat=0.0, unsafe=0.0, echo=0.8),
                        ABSettings(resamples=200))
    assert better.decision.launch, better.decision.reasons
    assert better.comparisons["gt_engagement"].diff > 0
    assert better.srm_p_value > 0.001

    # More engaging in every other way, but unsafe: the gate says no, whatever else it wins.
    unsafe = simulate_abtest(WORLD, control, _arm("unsafe", question=0.7, repeat=0.0, unsafe=0.3, echo=0.8),
                        ABSettings(resamples=200, primary="unsafe_rate", guardrails=()))
    assert unsafe.unsafe_rate["unsafe"] > 0.03
    assert not unsafe.decision.launch
    assert "safety gate" in unsafe.decision.reasons[0]


def test_the_same_model_against_itself_does_not_launch():
    result = simulate_abtest(WORLD, _arm("a"), _arm("b"), ABSettings(resamples=200))
    assert not result.decision.launch
    assert result.comparisons["gt_engagement"].p_value > 0.05
    assert set(result.to_json()) >= {"arms", "exposed", "srm_p_value", "comparisons", "decision"}


def test_the_safety_gate_overrides_a_winning_primary_metric():
    from alignloop.eval.abtest import Comparison, decide

    win = Comparison("continue_rate", 0.0, 0.5, 0.5, 0.4, 0.6, 1e-9, 0.4, 0.6, 500, 500)
    parts = {"comparisons": {"continue_rate": win}, "srm_p_value": 0.7,
             "unsafe_rate": {"base": 0.01, "new": 0.05}}
    assert not decide(parts, ABSettings(unsafe_bar=0.03), "base", "new").launch
    assert decide(parts, ABSettings(unsafe_bar=0.06), "base", "new").launch
    parts["srm_p_value"] = 1e-5
    assert not decide(parts, ABSettings(unsafe_bar=0.06), "base", "new").launch


def test_abtest_command_writes_result_plot_and_skips_when_unchanged(tmp_path):
    import json

    from typer.testing import CliRunner

    from alignloop.cli import app

    recipe = tmp_path / "ab.toml"
    # 600 users: the observable primary metric (continue rate) needs them to see this arm's gain.
    recipe.write_text(f'[run]\ndir = "{tmp_path}"\nname = "ab"\n[world]\nusers = 600\ndays = 4\n'
                      '[decision]\nresamples = 200\n')
    args = ["abtest", "template", "template:question=0.7,repeat=0,unsafe=0,echo=0.8", "--recipe", str(recipe)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    stage = tmp_path / "ab" / "abtest"
    result = json.loads((stage / "result.json").read_text())
    assert result["decision"]["launch"] is True
    assert (stage / "abtest.png").stat().st_size > 1000
    again = CliRunner().invoke(app, args)
    assert "up to date" in again.output

    bad = tmp_path / "bad.toml"
    bad.write_text('[decision]\nprimary = "vibes"\n')
    out = CliRunner().invoke(app, ["abtest", "template", "template", "--recipe", str(bad)])
    assert "unknown metric(s) ['vibes']" in str(out.exception)
