"""The launch decision rests only on what a real product could observe; ground truth is its check."""

import json
from pathlib import Path

import numpy as np
import pytest

from alignloop.errors import AlignloopError
from alignloop.eval import abtest as ab
from alignloop.eval.config import ABTestRecipe
from alignloop.flywheel.config import FlywheelRecipe
from alignloop.flywheel.report import write_report
from alignloop.flywheel.stage import launch_decision
from alignloop.recipes import load_recipe

ARMS = ("base", "new")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _comparison(metric, diff, p_value, control=0.5, sd=0.3, n=400):
    half = 1.96 * sd * (2 / n) ** 0.5
    return ab.Comparison(metric, control, control + diff, diff, diff - half, diff + half, p_value,
                         diff - half, diff + half, n, n, sd)


def _parts(**moves):
    """A finished test's parts: every metric flat (p = 0.6) unless moved to (diff, p)."""
    comparisons = {m: _comparison(m, *moves.get(m, (0.0, 0.6))) for m in ab.METRICS}
    return {"comparisons": comparisons, "srm_p_value": 0.7, "unsafe_rate": {"base": 0.01, "new": 0.01}}


def _result_json(parts, settings):
    """result.json of a test with these parts, as `simulate_abtest` writes it."""
    comparisons = parts["comparisons"]
    decision = ab.decide(parts, settings, *ARMS)
    result = ab.ABResult(list(ARMS), {a: 400 for a in ARMS}, {a: 400 for a in ARMS}, parts["srm_p_value"],
                         parts["unsafe_rate"], comparisons, decision, ab.primary_power(comparisons, settings),
                         ab.ground_truth_check(comparisons, settings))
    return json.loads(json.dumps(result.to_json()))


def _report_markdown(result, folder):
    launched, why = launch_decision({"abtest": result})
    turn = {"turn": 1, "deployed": "base", "model": "new", "launched": launched, "why": why,
            "summaries": {"abtest": result}}
    state = {"run": "t", "stages": ["abtest"], "timings": [], "turns": [turn], "deployed_at_end": "base"}
    return write_report(state, folder)["markdown"].read_text()


def test_ground_truth_rising_alone_does_not_launch_and_the_report_says_it_disagrees(tmp_path):
    # The quickstart's situation: true engagement up, significantly; every observable KPI flat.
    parts = _parts(gt_engagement=(0.48, 0.001), continue_rate=(-0.014, 0.6), turns_per_session=(-0.03, 0.7),
                   return_1d=(-0.05, 0.4))
    decision = ab.decide(parts, ab.ABSettings(), *ARMS)
    assert not decision.launch, decision.reasons

    result = _result_json(parts, ab.ABSettings())
    assert result["ground_truth"]["truth_better"] and not result["ground_truth"]["agrees"]
    headline, power, truth = ab.verdict_lines(result)
    assert headline == "observable decision: DO NOT LAUNCH (continue_rate -0.0140, p=0.6)"
    assert power.startswith("minimum detectable effect: continue_rate ±0.0594 (400 + 400 users")
    assert truth.startswith("ground truth (evaluation only): engagement +0.4800")
    assert truth.endswith("disagrees: ground truth is better, the observable KPIs did not show it")

    assert launch_decision({"abtest": result})[0] is False
    md = _report_markdown(result, tmp_path)
    assert "- A/B observable decision: DO NOT LAUNCH (continue_rate -0.0140, p=0.6)" in md
    assert "the observable KPIs did not show it" in md and "- turn decision: **DO NOT LAUNCH**" in md


def test_an_observable_win_launches_and_ground_truth_is_reported_beside_it(tmp_path):
    parts = _parts(gt_engagement=(0.48, 0.001), continue_rate=(0.05, 0.003))
    result = _result_json(parts, ab.ABSettings())
    assert result["decision"]["launch"] and result["ground_truth"]["agrees"]
    assert ab.verdict_lines(result)[0] == "observable decision: LAUNCH (continue_rate +0.0500, p=0.003)"
    assert ab.verdict_lines(result)[2].endswith(": agrees")

    # The KPIs win but ground truth does not follow: still a launch (the product cannot see the truth),
    # and the report says the two disagree.
    hollow = _result_json(_parts(continue_rate=(0.05, 0.003)), ab.ABSettings())
    assert hollow["decision"]["launch"]
    assert ab.verdict_lines(hollow)[2].endswith("disagrees: the observable KPIs say better, ground truth does not")
    assert "ground truth does not" in _report_markdown(hollow, tmp_path)


def test_ground_truth_can_be_neither_the_primary_metric_nor_a_guardrail(tmp_path):
    with pytest.raises(ValueError, match="gt_engagement is the simulator's ground truth"):
        ab.ABSettings(primary="gt_engagement")
    with pytest.raises(ValueError, match="ground truth"):
        ab.ABSettings(guardrails=("return_1d", "gt_engagement"))
    recipe = tmp_path / "ab.toml"
    for line in ('primary = "gt_engagement"', 'guardrails = ["gt_engagement"]'):
        recipe.write_text(f"[decision]\n{line}\n")
        with pytest.raises(AlignloopError) as caught:
            load_recipe(recipe, ABTestRecipe)
        message = str(caught.value)
        assert "no product can observe" in message and "\n" not in message


def test_quickstart_decides_on_an_observable_kpi():
    for name in ("quickstart", "hacked"):
        decision = load_recipe(RECIPES / f"{name}.toml", FlywheelRecipe).abtest.decision
        assert decision.primary == "continue_rate"
        assert not any(ab.is_ground_truth(m) for m in (decision.primary, *decision.guardrails))


def test_minimum_detectable_effect_is_found_with_the_stated_power():
    # (z(0.975) + z(0.8)) * sd * sqrt(2 / n) = 2.8016 * 1 * sqrt(2 / 200)
    assert ab.minimum_detectable_effect(1.0, 200, 200) == pytest.approx(0.28016, abs=1e-4)
    assert ab.minimum_detectable_effect(1.0, 200, 200, power=0.9) > ab.minimum_detectable_effect(1.0, 200, 200)
    # A true difference of exactly the MDE is significant in about 80% of repeated experiments.
    rng = np.random.default_rng(0)
    mde = ab.minimum_detectable_effect(1.0, 200, 200)
    hits = [ab.welch(rng.normal(0, 1, 200), rng.normal(mde, 1, 200))[3] < 0.05 for _ in range(600)]
    assert np.mean(hits) == pytest.approx(0.8, abs=0.05)


def test_abtest_prints_the_observable_decision_its_power_and_the_ground_truth(tmp_path):
    from typer.testing import CliRunner

    from alignloop.cli import app

    recipe = tmp_path / "ab.toml"
    recipe.write_text(f'[run]\ndir = "{tmp_path}"\nname = "ab"\n[world]\nusers = 40\ndays = 2\nmax_turns = 4\n'
                      '[decision]\nresamples = 100\n')
    out = CliRunner().invoke(app, ["abtest", "template", "template:echo=0.8", "--recipe", str(recipe)])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines()
             if line.startswith(("observable decision:", "minimum detectable effect:", "ground truth"))]
    assert [line.split(":")[0] for line in lines] == [
        "observable decision", "minimum detectable effect", "ground truth (evaluation only)"]
    result = json.loads((tmp_path / "ab" / "abtest" / "result.json").read_text())
    assert result["decision"]["primary"] == result["power"]["metric"] == "continue_rate"
    assert result["power"]["mde"] > 0 and result["ground_truth"]["metric"] == "gt_engagement"


def test_the_same_arm_twice_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from alignloop.cli import app
    from alignloop.errors import AlignloopError

    monkeypatch.chdir(tmp_path)  # the run folder goes to ./runs
    result = CliRunner().invoke(app, ["abtest", "template", "template"])
    assert isinstance(result.exception, AlignloopError)
    assert str(result.exception) == "both arms are 'template': an A/B test compares two different arms"
