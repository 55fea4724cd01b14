"""`alignloop eval groundtruth RECIPE`: models scored by the simulator's ground truth on held-out users.

1. Held-out users are sampled fresh (`[users]`); the recipe may list training logs and datasets
   (`users.exclude`) whose users must not appear among them.
2. Every model (`[models]`, label = zoo name or checkpoint folder) answers the same prompts through
   the engine with the same sampling and per-prompt seeds.
3. Each answer is scored with its writer's hidden taste: engagement and quality = sigmoid. Means
   and 95% intervals are over users (a user's prompts are not independent); every model is compared
   with the baseline on the same users: mean difference, interval, paired t-test p-value.
4. With `[pairs]`: held-out preference-pair accuracy of every model against one reference model
   (`eval.pairs`), on pairs from users that trained nothing (`pairs.exclude` checks it).

Output in runs/<run>/eval-groundtruth/: prompts.jsonl, responses/<label>.jsonl (answers and their
scores), pair_logps/<label>.safetensors, result.json, metrics.jsonl, manifest.json. Answers and
log-probs are cached per model under a fingerprint (model files, sampling, prompts), so a killed
evaluation resumes at the model it was on, and adding a model reuses the others' answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignloop.errors import AlignloopError
from alignloop.eval.config import GroundTruthRecipe, PairsSection
from alignloop.eval.groundtruth import Scores, score_texts
from alignloop.eval.heldout import HeldoutPrompts, check_disjoint, heldout_prompts
from alignloop.eval.pairs import accuracy, correct, pair_lengths, pair_logps, prefers_chosen
from alignloop.eval.respond import answer
from alignloop.eval.stats import mean_ci, paired, per_group_means
from alignloop.models import load_model, load_tokenizer
from alignloop.models.fingerprint import local_model_files, model_fingerprint
from alignloop.recipes import recipe_to_dict
from alignloop.runs import Stage, atomic_write_json, atomic_write_text, config_hash, default_run_name
from alignloop.train.cache import load_or_compute
from alignloop.train.dpo_data import TokenizedPair, pairs_digest, read_pairs, split_pairs, tokenize_pairs
from alignloop.ui import say

STAGE = "eval-groundtruth"


# --- one model ---------------------------------------------------------------------------------


def _answers(stage: Stage, label: str, model: str, prompts: HeldoutPrompts, recipe: GroundTruthRecipe) -> list[str]:
    """The model's answers, from the stage's cache when the model, sampling and prompts are unchanged."""
    key = config_hash({"model": model_fingerprint(model), "sampling": recipe.sampling.model_dump(mode="json"),
                       "engine": recipe.engine.model_dump(mode="json"), "prompts": prompts.messages})
    path = stage.path(f"responses/{label}.jsonl")
    cached = _read_cached(path, key, len(prompts))
    if cached is not None:
        say(f"{label}: answers cached ({path.name})")
        return cached
    say(f"{label}: {model} answers {len(prompts)} prompts")
    texts = answer(model, prompts.messages, recipe.sampling, max_batch=recipe.engine.max_batch,
                   dtype=recipe.engine.dtype)
    # Written without scores first: scores are recomputed from texts on every run (they are cheap).
    atomic_write_text(path, json.dumps({"key": key}) + "\n" + "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def _read_cached(path: Path, key: str, n: int) -> list[str] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        if json.loads(lines[0]).get("key") != key:
            return None
        texts = [json.loads(line)["text"] for line in lines[1:]]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return texts if len(texts) == n else None


def _write_scored(stage: Stage, label: str, texts: list[str], prompts: HeldoutPrompts, scores: Scores) -> Path:
    """responses/<label>.jsonl again, now with each answer's prompt and ground-truth scores."""
    path = stage.path(f"responses/{label}.jsonl")
    head = path.read_text(encoding="utf-8").splitlines()[0]
    rows = [json.dumps({"text": t, "user_id": u, "engagement": round(float(e), 6), "quality": round(float(q), 6)})
            for t, u, e, q in zip(texts, prompts.user_ids, scores.engagement, scores.quality, strict=True)]
    atomic_write_text(path, head + "\n" + "".join(r + "\n" for r in rows))
    return path


# --- pairs -------------------------------------------------------------------------------------


def _held_out_pairs(cfg: PairsSection, tokenizer: Any) -> tuple[list[TokenizedPair], dict[str, Any], list[str], int]:
    """(pairs, tokenization counts, their users, training users checked): tokenized as the DPO trainer
    does, restricted to its held-out split when asked, and refused if a training user wrote one."""
    pairs, counts = tokenize_pairs(tokenizer, read_pairs(cfg.path), cfg.max_seq_len)
    if cfg.split == "eval":
        _, pairs = split_pairs(pairs, cfg.eval_fraction, cfg.salt)
        if not pairs:
            raise AlignloopError(f"pairs: no pair of {cfg.path} falls in the held-out split")
    if cfg.max_pairs is not None and len(pairs) > cfg.max_pairs:
        keep = np.sort(np.random.default_rng(0).choice(len(pairs), cfg.max_pairs, replace=False))
        pairs = [pairs[i] for i in keep.tolist()]
    users = sorted({p.key for p in pairs})
    checked = check_disjoint(users, cfg.exclude, "held-out pair users")
    return pairs, counts.as_dict(), users, checked


def _all_logps(stage: Stage, recipe: GroundTruthRecipe, tokenizer: Any,
               pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
    """[P, 2] pair log-probs of the reference and every model, cached per model fingerprint."""
    cfg = recipe.pairs
    assert cfg is not None
    digest = pairs_digest(pairs)
    logps: dict[str, torch.Tensor] = {}
    by_fingerprint: dict[str, torch.Tensor] = {}  # the base model is usually the reference too: score it once
    for label, model in {"reference": cfg.reference, **recipe.models}.items():
        fingerprint = config_hash({"model": model_fingerprint(model), "pairs": digest, "bf16": cfg.bf16})
        if fingerprint in by_fingerprint:
            logps[label] = by_fingerprint[fingerprint]
            continue

        def compute(model: str = model, label: str = label) -> dict[str, torch.Tensor]:
            lm, tok = load_model(model, dtype="float32")
            if tok.get_vocab() != tokenizer.get_vocab():
                raise AlignloopError(f"pairs: {label} ({model}) has another tokenizer than the reference "
                                     f"{cfg.reference}: log-probs would not be comparable")
            return {"logps": pair_logps(lm, pairs, cfg.micro_batch, 2 * cfg.max_seq_len, tok.pad_token_id or 0,
                                        cfg.bf16, label)}

        logps[label] = by_fingerprint[fingerprint] = load_or_compute(
            stage.path(f"pair_logps/{label}.safetensors"), fingerprint, compute, f"{label} pair log-probs")["logps"]
    return logps


def _pair_results(stage: Stage, recipe: GroundTruthRecipe) -> dict[str, Any]:
    cfg = recipe.pairs
    assert cfg is not None
    tokenizer = load_tokenizer(cfg.reference)
    pairs, counts, users, checked = _held_out_pairs(cfg, tokenizer)
    lengths = pair_lengths(pairs)
    logps = _all_logps(stage, recipe, tokenizer, pairs)
    ref = logps["reference"]
    models = {label: accuracy(lp, ref, lengths).as_dict() for label, lp in logps.items() if label != "reference"}
    for label, m in models.items():
        ci = mean_ci(correct(logps[label], ref).numpy())
        m["accuracy_lo"], m["accuracy_hi"] = ci.lo, ci.hi
        ci = mean_ci(prefers_chosen(logps[label], lengths).numpy())
        m["logp_accuracy_lo"], m["logp_accuracy_hi"] = ci.lo, ci.hi

    def from_start(label: str) -> np.ndarray:
        start = cfg.start.get(label, "reference")
        return correct(logps[label], logps[start]).numpy()

    for label, start in cfg.start.items():
        own = from_start(label)
        ci = mean_ci(own)
        models[label]["vs_start"] = {"start": start, "accuracy": ci.mean, "lo": ci.lo, "hi": ci.hi}
        if start != "reference":
            # what this model's training added vs what its start's training added, pair by pair
            models[label]["vs_start"]["compared"] = paired(from_start(start), own).as_dict()
    return {"path": str(cfg.path), "reference": cfg.reference, "pairs": len(pairs), "users": len(users),
            "tokenized": counts, "exclude_users_checked": checked,
            "reference_logp_accuracy": accuracy(ref, None, lengths).logp_accuracy, "models": models}


# --- the stage ---------------------------------------------------------------------------------


def _looks_local(name: str) -> bool:
    """A folder path rather than a zoo name or an 'org/name' hub id."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).is_dir()))


def _stage(recipe: GroundTruthRecipe, run: str | None) -> Stage:
    """The stage, its inputs every local model's files (and the pairs with their reference's)."""
    for label, model in recipe.models.items():
        if _looks_local(model) and not Path(model).expanduser().is_dir():
            raise AlignloopError(f"models.{label}: no model folder {model} (train it first?)")
    inputs = [p for model in recipe.models.values() for p in local_model_files(model)]
    if recipe.pairs is not None:
        inputs += [recipe.pairs.path, *local_model_files(recipe.pairs.reference)]
    return Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), STAGE, recipe_to_dict(recipe),
                 inputs=inputs)


def run_groundtruth(recipe: GroundTruthRecipe, run: str | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate, write runs/<run>/eval-groundtruth/, print the summary lines, return the result."""
    stage = _stage(recipe, run)
    if stage.skip_if_complete(force, label="eval groundtruth"):
        result = json.loads(stage.path("result.json").read_text(encoding="utf-8"))
        for line in summary_lines(result):
            print(line)
        return result
    prompts = heldout_prompts(recipe.users)
    checked = check_disjoint(prompts.user_ids, recipe.users.exclude)
    prompts_path = stage.path("prompts.jsonl")
    atomic_write_text(prompts_path, "".join(json.dumps(r) + "\n" for r in prompts.records()))
    say(f"eval: {len(prompts)} prompts from {prompts.n_users} held-out users (seed {recipe.users.seed})"
        + (f", none among {checked} training users" if recipe.users.exclude else ""))
    models, per_user, outputs = _score_models(stage, recipe, prompts)
    base = recipe.baseline_label
    comparisons = {
        label: {"vs": base, **{metric: paired(per_user[base][metric], per_user[label][metric]).as_dict()
                               for metric in ("engagement", "quality")}}
        for label in recipe.models if label != base
    }
    result: dict[str, Any] = {
        "prompts": len(prompts), "users": prompts.n_users, "users_seed": recipe.users.seed,
        "exclude_users_checked": checked, "sampling": recipe.sampling.model_dump(mode="json"),
        "models": models, "baseline": base, "comparisons": comparisons,
    }
    if recipe.pairs is not None:
        result["pairs"] = _pair_results(stage, recipe)
        outputs += sorted(stage.path("pair_logps").glob("*.safetensors"))
    atomic_write_json(stage.path("result.json"), result)
    outputs = [prompts_path, *outputs, stage.path("result.json")]
    stage.finish(outputs, extra={"result_digest": hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()})
    for line in summary_lines(result):
        print(line)
    return result


def _score_models(stage: Stage, recipe: GroundTruthRecipe, prompts: HeldoutPrompts
                  ) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], list[Path]]:
    """(each model's means with intervals, its per-user means, its scored answers files)."""
    outputs = []
    per_user: dict[str, dict[str, np.ndarray]] = {}
    models: dict[str, Any] = {}
    for label, model in recipe.models.items():
        texts = _answers(stage, label, model, prompts, recipe)
        scores = score_texts(texts, prompts.user_texts, prompts.taste)
        outputs.append(_write_scored(stage, label, texts, prompts, scores))
        per_user[label] = {"engagement": per_group_means(scores.engagement, prompts.user_rows),
                           "quality": per_group_means(scores.quality, prompts.user_rows)}
        models[label] = {"model": model, "engagement": mean_ci(per_user[label]["engagement"]).as_dict(),
                         "quality": mean_ci(per_user[label]["quality"]).as_dict(),
                         "features": scores.feature_means()}
        stage.log_metrics(model=label, engagement=models[label]["engagement"]["mean"],
                          quality=models[label]["quality"]["mean"])
    return models, per_user, outputs


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The result in a few lines a person can paste into a report."""
    lines = []
    n, u = result["prompts"], result["users"]
    for label, m in result["models"].items():
        e, q = m["engagement"], m["quality"]
        lines.append(f"ground truth, {label}: engagement {e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}], "
                     f"quality {q['mean']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] on {n} held-out prompts "
                     f"({u} users, 95% CI) | words {m['features']['words']:.1f}, "
                     f"relevance {m['features']['relevance']:.2f}")
    for label, c in result["comparisons"].items():
        e, q = c["engagement"], c["quality"]
        lines.append(f"{label} vs {c['vs']}: engagement {e['diff_mean']:+.3f} [{e['diff_lo']:+.3f}, {e['diff_hi']:+.3f}] "
                     f"paired p = {e['p_value']:.2g}; quality {q['diff_mean']:+.3f} "
                     f"[{q['diff_lo']:+.3f}, {q['diff_hi']:+.3f}] p = {q['p_value']:.2g} (n = {e['diff_n']} users)")
    if "pairs" in result:
        p = result["pairs"]
        accs = ", ".join(f"{label} {m['accuracy']:.3f}" for label, m in p["models"].items())
        own = ", ".join([f"reference {p['reference_logp_accuracy']:.3f}"]
                        + [f"{label} {m['logp_accuracy']:.3f}"
                           + (f" [{m['logp_accuracy_lo']:.3f}, {m['logp_accuracy_hi']:.3f}]"
                              if "logp_accuracy_lo" in m else "") for label, m in p["models"].items()])
        lines.append(f"held-out pair accuracy vs reference {p['reference']} ({p['pairs']} pairs, {p['users']} users "
                     f"no model trained on): {accs}; own log-prob preference: {own}")
        for label, m in p["models"].items():
            if "vs_start" not in m:
                continue
            v = m["vs_start"]
            line = (f"held-out pair accuracy of {label} vs its start {v['start']}: {v['accuracy']:.3f} "
                    f"[{v['lo']:.3f}, {v['hi']:.3f}] ({p['pairs']} pairs, 95% CI)")
            if "compared" in v:
                c = v["compared"]
                line += (f"; minus {v['start']}'s own vs its start: {c['diff_mean']:+.3f} "
                         f"[{c['diff_lo']:+.3f}, {c['diff_hi']:+.3f}] paired p = {c['p_value']:.2g}")
            lines.append(line)
    return lines + table_lines(result)


def table_lines(result: dict[str, Any]) -> list[str]:
    """One markdown row per model: engagement and quality (95% CI over users), words per answer, and
    the paired difference from the baseline (interval and p-value) on the same users."""
    base = result.get("baseline") or next(iter(result["models"]))
    head = (f"| model | engagement [95% CI] | quality [95% CI] | words | engagement vs {base} [95% CI], p "
            f"| quality vs {base} [95% CI], p |")
    lines = [head, "|" + "---|" * 6]
    for label, m in result["models"].items():
        e, q = m["engagement"], m["quality"]
        c = result["comparisons"].get(label)

        def diff(metric: str, c: dict | None = c) -> str:
            if c is None:
                return "(baseline)"
            d = c[metric]
            return f"{d['diff_mean']:+.3f} [{d['diff_lo']:+.3f}, {d['diff_hi']:+.3f}], p = {d['p_value']:.2g}"

        lines.append(f"| {label} | {e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] | {q['mean']:.3f} "
                     f"[{q['lo']:.3f}, {q['hi']:.3f}] | {m['features']['words']:.1f} | {diff('engagement')} "
                     f"| {diff('quality')} |")
    lines.append(f"({result['prompts']} held-out prompts, {result['users']} users; paired differences over the "
                 f"same users)")
    return lines
