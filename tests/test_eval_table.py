"""The ground-truth table: one row per model, words per answer, paired differences from the baseline."""

from pathlib import Path

from alignloop.eval.stage import summary_lines, table_lines

REPO = Path(__file__).resolve().parents[1]


def _model(engagement: float, words: float) -> dict:
    return {"engagement": {"mean": engagement, "lo": engagement - 0.1, "hi": engagement + 0.1},
            "quality": {"mean": 0.5, "lo": 0.45, "hi": 0.55}, "features": {"words": words, "relevance": 0.3}}


def _diff(d: float, p: float) -> dict:
    return {"diff_mean": d, "diff_lo": d - 0.05, "diff_hi": d + 0.05, "p_value": p, "diff_n": 800}


RESULT = {"prompts": 800, "users": 800, "baseline": "sft",
          "models": {"base": _model(0.1, 52.0), "sft": _model(0.2, 41.5), "ld_dpo": _model(0.31, 44.25)},
          "comparisons": {"base": {"vs": "sft", "engagement": _diff(-0.1, 0.001), "quality": _diff(0.0, 0.9)},
                          "ld_dpo": {"vs": "sft", "engagement": _diff(0.11, 0.0004), "quality": _diff(0.01, 0.5)}}}


def test_table_has_a_row_per_model_with_words_and_paired_differences():
    lines = table_lines(RESULT)
    assert lines[0].startswith("| model | engagement [95% CI] | quality [95% CI] | words | engagement vs sft")
    rows = {line.split("|")[1].strip(): line for line in lines[2:-1]}
    assert list(rows) == ["base", "sft", "ld_dpo"]
    assert "| 44.2 |" in rows["ld_dpo"] and "+0.110 [+0.060, +0.160], p = 0.0004" in rows["ld_dpo"]
    assert "(baseline)" in rows["sft"]
    assert summary_lines(RESULT)[-len(lines):] == lines


def test_preference_recipe_compares_with_sft():
    from alignloop.eval.config import GroundTruthRecipe
    from alignloop.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes/preference_groundtruth.toml", GroundTruthRecipe)
    assert recipe.baseline_label == "sft" and recipe.users.users >= 800 and recipe.sampling.max_tokens == 64
    assert list(recipe.models) == ["base", "sft", "dpo", "ld_dpo", "rdpo", "simpo", "kto"]
