"""Evaluation: how good a model is for users, measured where the truth is known.

`heldout` (fresh simulated users and the prompts they write; disjointness from training users),
`groundtruth` (texts + users -> the simulator's engagement and quality: the function A/B tests and
RL curves reuse), `respond` (a model answers prompts through the engine), `stats` (intervals,
paired comparisons), `pairs` (held-out preference-pair accuracy against a common reference),
`rules`, `judge` (rule metrics, LLM-judge rubric), `abtest` (simulated A/B tests). The stages:
`config` (their recipes), `stage` (`alignloop eval groundtruth RECIPE`), `abtest_stage`
(`alignloop abtest A B`) and `offline` (the flywheel's deployed-vs-new evaluation).
"""

from alignloop.eval.groundtruth import Scores, score_texts
from alignloop.eval.heldout import HeldoutPrompts, UsersSection, check_disjoint, heldout_prompts
from alignloop.eval.stats import Estimate, PairedDifference, mean_ci, paired

__all__ = ["Estimate", "HeldoutPrompts", "PairedDifference", "Scores", "UsersSection", "check_disjoint",
           "heldout_prompts", "mean_ci", "paired", "score_texts"]
