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

On real logs (`run_logs_eval`) nobody's true taste is known: the models (base, SFT, RL) answer
held-out real users' prompts (the build's rl/eval.jsonl: users of the reward models' eval split,
checked against every training set), and what is measured is the learned reward of the answers
(per user, with intervals; paired between models), rule metrics and the judge. The learned reward
is the one RL climbed, so a gain in it on new users' prompts says RL's gain carried over to them,
not that they would like the answers: only an A/B test with people could say that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from alignloop.engine.engine import Engine
from alignloop.errors import AlignloopError
from alignloop.eval.config import OfflineEvalSection
from alignloop.eval.groundtruth import score_texts
from alignloop.eval.heldout import HeldoutPrompts, check_disjoint, heldout_prompts
from alignloop.eval.judge import EndpointJudge, judge_report, rubric_eval
from alignloop.eval.respond import answer
from alignloop.eval.rules import rule_metrics
from alignloop.eval.stats import mean_ci, paired, per_group_means
from alignloop.models.fingerprint import local_model_files
from alignloop.rewards.serve import load_reward_fn
from alignloop.rl.reward_env import reward_folder
from alignloop.runs import MANIFEST, Stage, atomic_write_json, default_run_name
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
    # max_prompts is the real-logs evaluation's: it must not make simulated evaluations run again.
    config = {"eval": section.model_dump(mode="json", exclude={"max_prompts"}), "models": models}
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
        _run_judge(section, default_judge or deployed, prompts.messages, texts, out)
    samples = [{"messages": m, **{name: t[i] for name, t in texts.items()}}
               for i, m in enumerate(prompts.messages[:SAMPLES])]
    atomic_write_json(stage.path("samples.json"), samples)
    atomic_write_json(stage.path("eval.json"), out)
    stage.finish([stage.path("eval.json"), stage.path("samples.json")])
    say(f"eval: ground-truth engagement deployed {out['deployed']['gt_engagement']:+.3f} -> "
        f"new {out['new']['gt_engagement']:+.3f} on {len(prompts)} held-out prompts")
    return out


def _run_judge(section: OfflineEvalSection, default_judge: str, messages: list[list[dict]],
               texts: dict[str, list[str]], out: dict[str, Any]) -> None:
    """Rubric scores of each model's first `judge_prompts` answers into out[name]: always its
    judge_status; "judge" only when the judge mostly answered (reports print those means as scores,
    and means of the few answers a weak judge got right are not scores)."""
    judge, label, max_tokens = _judge(section, default_judge)
    k = min(section.judge_prompts, len(messages))
    for name, answers in texts.items():
        result = rubric_eval(judge, messages[:k], answers[:k], max_tokens=max_tokens)
        status = judge_report(result, label, section.judge_min_parse_rate)
        out[name]["judge_status"] = {key: v for key, v in status.items() if key != "scores"}
        if status["available"]:
            out[name]["judge"] = status["scores"]
        say(f"eval: {name} model: {status['message']}")


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
    # The interval is over users (one user's prompts are not independent): a model's ground truth with
    # its 95% interval, so turns of the flywheel (same held-out users every turn) compare on one chart.
    per_user = per_group_means(gt.engagement, prompts.user_rows)
    summary = {"gt_engagement": float(np.mean(gt.engagement)), "gt_quality": float(np.mean(gt.quality)),
               "gt_engagement_ci": mean_ci(per_user).as_dict(),
               "features": gt.feature_means(), "rules": rule_metrics(texts).to_json()}
    return summary, gt.engagement


# --- real logs ----------------------------------------------------------------------------------


def logs_prompts(path: str | Path, limit: int) -> pl.DataFrame:
    """Held-out prompts (user_id, messages) from an rl/eval.jsonl, at most `limit` of them: a sample by
    a hash of each prompt's id, so it is the same whatever the file's order and grows by adding rows."""
    rows = pl.read_ndjson(path)
    missing = {"example_id", "user_id", "messages"} - set(rows.columns)
    if missing:
        raise AlignloopError(f"{path}: missing column(s) {sorted(missing)}")
    key = [hashlib.sha256(f"eval-prompts:{e}".encode()).hexdigest() for e in rows["example_id"].to_list()]
    return rows.with_columns(_key=pl.Series(key)).sort("_key").head(limit).drop("_key")


def run_logs_eval(section: OfflineEvalSection, run: RunSection, models: dict[str, str], prompts_path: str | Path,
                  force: bool = False, *, reward: str | Path | None = None, exclude: Sequence[str | Path] = (),
                  dtype: str = "auto", default_judge: str | None = None) -> dict[str, Any]:
    """Score `models` (label -> zoo name or folder, in report order; the first is the baseline) on
    held-out real users' prompts in runs/<run>/eval/ (or reuse an identical finished one); return eval.json.

    `reward`: an `rm train` folder whose combined reward scores every answer (none: not measured);
    `exclude`: training sets whose users must not be among the held-out ones (checked, or an error).
    """
    prompts_path = Path(prompts_path)
    rm_dir = reward_folder(str(reward)) if reward is not None else None
    inputs = [prompts_path, *(p for model in models.values() for p in local_model_files(model)),
              *([rm_dir / MANIFEST] if rm_dir is not None else [])]
    config = {"eval": section.model_dump(mode="json", exclude={"users"}), "models": models,
              "prompts": str(prompts_path), "reward": None if rm_dir is None else str(rm_dir)}
    stage = Stage(run.dir, run.name or default_run_name(), "eval", config, inputs=inputs)
    if stage.skip_if_complete(force):
        return json.loads(stage.path("eval.json").read_text())
    rows = logs_prompts(prompts_path, section.max_prompts)
    if not rows.height:
        raise AlignloopError(f"{prompts_path}: no held-out prompts to evaluate on")
    messages, users = rows["messages"].to_list(), np.asarray(rows["user_id"].to_list())
    checked = check_disjoint(users.tolist(), exclude)
    out: dict[str, Any] = {"kind": "logs", "source": str(prompts_path), "prompts": len(messages),
                           "users": int(np.unique(users).size), "models": models, "training_sets_checked": len(exclude),
                           "training_users_checked": checked,
                           "reward": None if rm_dir is None else str(rm_dir)}
    texts: dict[str, list[str]] = {}
    # Real prompts carry earlier answers: repetition across turns is measured against them.
    histories = [[m["content"] for m in c if m["role"] == "assistant"] for c in messages]
    for name, model in models.items():
        say(f"eval: {name} model ({model}) answers {len(messages)} held-out real prompts")
        texts[name] = answer(model, messages, section.sampling, dtype=dtype)
        out[name] = {"rules": rule_metrics(texts[name], histories).to_json()}
    if rm_dir is not None:
        _learned_reward(load_reward_fn(rm_dir), messages, users, texts, out)
    if section.judge:
        _run_judge(section, default_judge or next(iter(models.values())), messages, texts, out)
    samples = [{"messages": m, **{name: t[i] for name, t in texts.items()}} for i, m in enumerate(messages[:SAMPLES])]
    atomic_write_json(stage.path("samples.json"), samples)
    atomic_write_json(stage.path("eval.json"), out)
    stage.finish([stage.path("eval.json"), stage.path("samples.json")])
    for line in logs_eval_lines(out):
        if not line.startswith("judge, "):  # said per model as the judge finished
            say(f"eval: {line}")
    return out


def _learned_reward(reward: Any, messages: list[list[dict]], users: np.ndarray, texts: dict[str, list[str]],
                    out: dict[str, Any]) -> None:
    """Each model's learned reward on the prompts, over users (one user's prompts are not independent):
    mean and 95% interval of the per-user means, component means; then every later model against
    every earlier one, paired by user, with the share of prompts on which it scored higher."""
    per_prompt, per_user = {}, {}
    for name, answers in texts.items():
        batch = reward(messages, answers)
        per_prompt[name] = batch.reward
        per_user[name] = per_group_means(batch.reward, users)
        out[name]["reward"] = {**mean_ci(per_user[name]).as_dict(), "prompts_mean": float(batch.reward.mean()),
                               "components": {k: float(v.mean()) for k, v in batch.components.items()
                                              if k.startswith("raw/")}}
    out["pairs"] = {f"{b}_vs_{a}": {**paired(per_user[a], per_user[b]).as_dict(),
                                    "win_rate": float(np.mean(per_prompt[b] > per_prompt[a])),
                                    "tie_rate": float(np.mean(per_prompt[b] == per_prompt[a]))}
                    for a, b in combinations(texts, 2)}


def logs_eval_lines(e: dict[str, Any]) -> list[str]:
    """One line per measurement of a real-logs evaluation (printed by the stage and the flywheel, and
    in the report)."""
    names = [k for k in e["models"] if k in e]
    sets = e.get("training_sets_checked", 0)
    lines = [f"{e['prompts']} held-out prompts of {e['users']} real users"
             + (f" (none of them in any of the {sets} training sets, checked)" if sets else "")]
    if all("reward" in e[n] for n in names):
        lines.append("learned reward (per-user mean, 95% CI): " + "; ".join(
            f"{n} {e[n]['reward']['mean']:+.3f} [{e[n]['reward']['lo']:+.3f}, {e[n]['reward']['hi']:+.3f}]"
            for n in names))
        for pair, d in e.get("pairs", {}).items():
            lines.append(f"learned reward {pair.replace('_vs_', ' - ')}: {d['diff_mean']:+.3f} "
                         f"[{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}], p = {d['p_value']:.3g}; "
                         f"higher on {d['win_rate']:.0%} of prompts")
    else:
        lines.append("learned reward: not measured (no reward models this turn)")
    keys = ("mean_words", "distinct_2", "question_rate", "repetition_across", "empty_rate")
    lines.append("rules: " + "; ".join(f"{n} " + ", ".join(f"{k} {_num(e[n]['rules'].get(k))}" for k in keys
                                                           if k in e[n]["rules"]) for n in names))
    judged = [n for n in names if "judge_status" in e[n]]
    if judged:
        lines += [f"judge, {n}: {e[n]['judge_status']['message']}" for n in judged]
    else:
        lines.append("judge: not run (eval.judge = false)")
    return lines


def _num(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) else str(x)
