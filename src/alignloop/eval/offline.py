"""Offline evaluation of a new model against the deployed one, on held-out users' prompts.

Both models answer the same prompts (fresh simulated users, none of whom wrote the logs the new
model was trained on) with the same sampling seeds, so their scores compare prompt by prompt:
ground-truth engagement and quality from the writers' hidden taste, rule metrics, and, when asked,
an LLM judge's rubric scores on the first `judge_prompts` answers (a local model or an
OpenAI-compatible endpoint; `judge_status` holds its parse rate, and a judge that gave a score in
fewer than `judge_min_parse_rate` of its answers is reported "judge unavailable: parsed k of n",
with no scores).

Output in runs/<run>/eval/: eval.json (what `run_offline_eval` returns), samples.json (the first
20 prompts with both answers), metrics.jsonl, manifest.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.engine.engine import Engine
from alignloop.eval.config import OfflineEvalSection
from alignloop.eval.groundtruth import score_texts
from alignloop.eval.heldout import HeldoutPrompts, check_disjoint, heldout_prompts
from alignloop.eval.judge import EndpointJudge, judge_report, rubric_eval
from alignloop.eval.respond import answer
from alignloop.eval.rules import rule_metrics
from alignloop.eval.stats import paired
from alignloop.models.fingerprint import local_model_files
from alignloop.runs import Stage, atomic_write_json, default_run_name
from alignloop.sections import RunSection
from alignloop.ui import say

SAMPLES = 20
"""Prompts whose answers (both models') samples.json keeps for reading by eye."""


def run_offline_eval(section: OfflineEvalSection, run: RunSection, deployed: str, new: str, force: bool = False, *,
                     exclude: Sequence[str | Path] = (), dtype: str = "auto",
                     default_judge: str | None = None) -> dict[str, Any]:
    """Score both models in runs/<run>/eval/ (or reuse an identical finished evaluation); return eval.json.

    `exclude`: training logs or datasets whose users must not be among the held-out ones;
    `default_judge`: the judge model when the section names none (the flywheel passes its base
    model); with neither, the deployed model judges.
    """
    models = {"deployed": deployed, "new": new}
    inputs = [p for model in models.values() for p in local_model_files(model)]
    config = {"eval": section.model_dump(mode="json"), "models": models}
    stage = Stage(run.dir, run.name or default_run_name(), "eval", config, inputs=inputs)
    if stage.skip_if_complete(force):
        return json.loads(stage.path("eval.json").read_text())
    prompts = heldout_prompts(section.users)
    check_disjoint(prompts.user_ids, exclude)
    out: dict[str, Any] = {"prompts": len(prompts), "users": prompts.n_users, "models": models}
    texts, engagement = {}, {}
    for name, model in models.items():
        say(f"eval: {name} model ({model}) answers {len(prompts)} held-out prompts")
        texts[name] = answer(model, prompts.messages, section.sampling, dtype=dtype)
        out[name], engagement[name] = _scores(texts[name], prompts)
    # Same prompts, same sampling seeds: a paired comparison.
    out["new_vs_deployed"] = paired(engagement["deployed"], engagement["new"]).as_dict()
    if section.judge:
        judge, label, max_tokens = _judge(section, default_judge or deployed)
        k = min(section.judge_prompts, len(prompts))
        for name, answers in texts.items():
            result = rubric_eval(judge, prompts.messages[:k], answers[:k], max_tokens=max_tokens)
            status = judge_report(result, label, section.judge_min_parse_rate)
            out[name]["judge_status"] = {key: v for key, v in status.items() if key != "scores"}
            # Only a judge that mostly answered gets a "judge" entry: reports print its means as
            # scores, and means of the few answers a weak judge got right are not scores.
            if status["available"]:
                out[name]["judge"] = status["scores"]
            say(f"eval: {name} model: {status['message']}")
    samples = [{"messages": m, **{name: t[i] for name, t in texts.items()}}
               for i, m in enumerate(prompts.messages[:SAMPLES])]
    atomic_write_json(stage.path("samples.json"), samples)
    atomic_write_json(stage.path("eval.json"), out)
    stage.finish([stage.path("eval.json"), stage.path("samples.json")])
    say(f"eval: ground-truth engagement deployed {out['deployed']['gt_engagement']:+.3f} -> "
        f"new {out['new']['gt_engagement']:+.3f} on {len(prompts)} held-out prompts")
    return out


def _judge(section: OfflineEvalSection, default: str) -> tuple[Any, str, int]:
    """(the judge, its name for reports, max tokens per answer)."""
    ep = section.judge_endpoint
    if ep is not None:
        judge = EndpointJudge(ep.base_url, ep.model, ep.api_key_env, ep.timeout_s, ep.concurrency)
        return judge, f"{ep.model} at {judge.url}", ep.max_tokens
    model = section.judge_model or default
    return Engine.from_name(model, seed=0, show_progress=False), f"{model} (local)", 16


def _scores(texts: list[str], prompts: HeldoutPrompts) -> tuple[dict[str, Any], np.ndarray]:
    """(one model's summary: mean ground truth, text features, rule metrics; its per-prompt engagement)."""
    gt = score_texts(texts, prompts.user_texts, prompts.taste)
    summary = {"gt_engagement": float(np.mean(gt.engagement)), "gt_quality": float(np.mean(gt.quality)),
               "features": gt.feature_means(), "rules": rule_metrics(texts).to_json()}
    return summary, gt.engagement
