"""The three stages: `rm train` (runs/<run>/rm/), `rm eval` (rm-eval/), `reward fit-weights` (reward/).

`run_rm_train`, `run_rm_eval` and `run_fit_weights` each take the one `rm` recipe
(`alignloop.rewards.config.RMRecipe`), skip themselves when their manifest still matches, and pin
torch to `backbone.threads` while they run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from alignloop.errors import AlignloopError
from alignloop.recipes import recipe_to_dict
from alignloop.rewards import metrics as M
from alignloop.rewards.backbones import make_backbone
from alignloop.rewards.combine import Normalizer, choose_weights, score_weights
from alignloop.rewards.config import BINARY, RMRecipe
from alignloop.rewards.data import HeadData, activity_features, activity_matrix, check_disjoint, dataset_path, load_head
from alignloop.rewards.model import Features, RewardModel
from alignloop.rewards.plot import plot_rm_metrics
from alignloop.rewards.serve import COMBINE_FILE, WEIGHTS_FILE
from alignloop.runs import Stage, atomic_write_json, default_run_name
from alignloop.train.threads import torch_threads
from alignloop.ui import progress, say


def _signal(head: str) -> str:
    return "continue" if head == "quality" else head


def _inputs(recipe: RMRecipe, splits: tuple[str, ...]) -> list[Path]:
    build = Path(recipe.data.build)
    files = [dataset_path(build, _signal(h), s) for h in recipe.data.heads for s in splits]
    if recipe.data.quality_labels is not None:
        files.append(Path(recipe.data.quality_labels))
    return files


def load_sets(recipe: RMRecipe, split: str) -> dict[str, HeadData]:
    limit = recipe.data.max_train_rows if split == "train" else recipe.data.max_eval_rows
    return {h: load_head(recipe.data, h, split, limit) for h in recipe.data.heads}


def _check_split(recipe: RMRecipe) -> None:
    """Disjointness on whole files (user ids only), not samples: a shared user anywhere is a bad split."""
    build = Path(recipe.data.build)
    for h in recipe.data.heads:
        users = {}
        for split in ("train", "eval"):
            path = dataset_path(build, _signal(h), split)
            df = pl.read_parquet(path, columns=["user_id"]) if path.suffix == ".parquet" else pl.read_ndjson(path)
            if "user_id" not in df.columns:
                raise AlignloopError(f"{path}: missing column(s) ['user_id']")
            users[split] = df["user_id"].unique()
        shared = users["train"].filter(users["train"].is_in(users["eval"].implode()))
        if shared.len():
            raise AlignloopError(f"head {h}: {shared.len()} user(s) in both train and eval (e.g. {shared[0]}); "
                                 "the split must be by user")


def _norm_rows(recipe: RMRecipe, sets: dict[str, HeadData]) -> HeadData:
    for h in ("continue", "turns_after", "time_to_next", "returned_7d", "thumbs", "safety"):
        if h in sets:
            return sets[h]
    return next(iter(sets.values()))


# --- rm train ----------------------------------------------------------------------------------


def run_rm_train(recipe: RMRecipe, run: str | None = None, force: bool = False) -> Stage:
    with torch_threads(recipe.backbone.threads):
        return _run_rm_train(recipe, run, force)


def _run_rm_train(recipe: RMRecipe, run: str | None, force: bool) -> Stage:
    run = run or recipe.run.name or default_run_name()
    config = {k: v for k, v in recipe_to_dict(recipe).items() if k in ("data", "backbone", "train", "combine")}
    stage = Stage(recipe.run.dir, run, "rm", config, inputs=_inputs(recipe, ("train",)))
    if stage.skip_if_complete(force):
        return stage
    _check_split(recipe)
    train = load_sets(recipe, "train")
    say("rm: " + ", ".join(f"{h} {len(d)}" for h, d in train.items()) + f" training examples; backbone "
        f"{recipe.backbone.kind}{'' if recipe.backbone.kind == 'minilm' else ' ' + recipe.backbone.model}")
    backbone = make_backbone(recipe.backbone, stage.path("embeddings"), seed=recipe.train.seed)
    model = RewardModel(backbone, recipe.data.heads, recipe.train, activity=recipe.train.user_activity)
    act = activity_features(recipe.data, "train") if recipe.train.user_activity else None
    with progress() as bar:
        model.fit(train, act, progress=bar, log=lambda step, values: stage.log_metrics(step, **values),
                  describe="rm heads")
        ref = _norm_rows(recipe, train)
        n = min(recipe.combine.norm_rows, len(ref))
        feats = model.features(ref, bar).x[:n]
    raw = model.predict(feats, activity_matrix(act, ref.user_id[:n]) if act else None)
    normalizer = Normalizer.fit({k: v for k, v in raw.items() if k != "safety"})
    outputs = model.save(stage.dir)
    combine = stage.path(COMBINE_FILE)
    atomic_write_json(combine, {"normalizer": normalizer.to_dict(), "stats_from": f"{ref.head}/train ({n} rows)",
                                "combine": recipe.combine.model_dump(mode="json")})
    stage.finish([*outputs, combine], extra={"examples": {h: len(d) for h, d in train.items()},
                                             "best_step": getattr(model, "best_steps", {}),
                                             "calibration": getattr(model, "calibration", {})})
    say(f"rm: heads {', '.join(model.names)} -> {stage.dir}")
    return stage


# --- rm eval -----------------------------------------------------------------------------------


def _head_report(head: str, d: HeadData, pred: np.ndarray, pred_rejected: np.ndarray | None, train: HeadData,
                 bins: int) -> dict[str, Any]:
    if head == "preference":
        assert pred_rejected is not None
        # A tie (e.g. a model that cannot tell the two answers apart) counts half, as a coin flip would.
        acc = float(np.mean(pred > pred_rejected) + 0.5 * np.mean(pred == pred_rejected))
        return {"pair_accuracy": acc, "baseline_pair_accuracy": 0.5, "n": len(d)}
    if head in BINARY:
        return M.binary_report(d.label, pred, float(np.average(train.label, weights=train.weight)), bins)
    if head == "time_to_next":
        obs = ~d.censored
        tr_obs = train.label[~train.censored]
        out = M.regression_report(np.log(np.clip(d.label[obs], 1e-3, None)), pred[obs],
                                  float(np.log(np.clip(tr_obs, 1e-3, None)).mean()))
        out["concordance"] = M.concordance(d.label, d.censored, pred)
        out["censored_share"] = float(d.censored.mean())
        return out
    y = np.log1p(d.label) if head == "turns_after" else d.label
    ty = np.log1p(train.label) if head == "turns_after" else train.label
    return M.regression_report(y, pred, float(ty.mean()))


def _predict_sets(model: RewardModel, sets: dict[str, HeadData], feats: dict[str, Features],
                  act: dict[str, np.ndarray] | None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    out = {}
    for h, d in sets.items():
        a = activity_matrix(act, d.user_id) if act is not None else None
        p = model.predict(feats[h].x, a, [h])[h]
        pr = model.predict(feats[h].x_rejected, a, [h])[h] if feats[h].x_rejected is not None else None
        out[h] = (p, pr)
    return out


def run_rm_eval(recipe: RMRecipe, run: str | None = None, force: bool = False) -> Stage:
    with torch_threads(recipe.backbone.threads):
        return _run_rm_eval(recipe, run, force)


def _trained(recipe: RMRecipe, run: str | None, needs: str) -> tuple[str, Path]:
    """(run name, its `rm train` folder), which must hold `needs`."""
    run = run or recipe.run.name or default_run_name()
    rm_dir = Path(recipe.run.dir) / run / "rm"
    if not (rm_dir / needs).is_file():
        raise AlignloopError(f"no trained reward model in {rm_dir} (run `alignloop rm train` first)")
    return run, rm_dir


def _run_rm_eval(recipe: RMRecipe, run: str | None, force: bool) -> Stage:
    run, rm_dir = _trained(recipe, run, "heads.safetensors")
    config = {k: v for k, v in recipe_to_dict(recipe).items() if k in ("data", "eval")}
    stage = Stage(recipe.run.dir, run, "rm-eval", config,
                  inputs=[rm_dir / "heads.safetensors", *_inputs(recipe, ("train", "eval"))])
    if stage.skip_if_complete(force):
        return stage
    cfg = recipe.eval
    backbone = make_backbone(recipe.backbone, rm_dir / "embeddings", seed=recipe.train.seed)
    model = RewardModel.load(rm_dir, backbone=backbone)
    missing = [h for h in recipe.data.heads if h not in model.names]
    if missing:
        raise AlignloopError(f"the reward model in {rm_dir} has no head(s) {missing}")
    train, evals = load_sets(recipe, "train"), load_sets(recipe, "eval")
    for h in recipe.data.heads:
        check_disjoint(train[h], evals[h])
    act = activity_features(recipe.data, "train"), activity_features(recipe.data, "eval")
    with progress() as bar:
        f_eval = {h: model.features(d, bar) for h, d in evals.items()}
        preds = _predict_sets(model, evals, f_eval, act[1] if model.activity else None)
        report: dict[str, Any] = {h: _head_report(h, evals[h], *preds[h], train[h], cfg.ece_bins) for h in evals}
        for h, c in _ceilings(recipe, evals).items():
            report[h]["ceiling"] = c
        if cfg.shortcut:
            for h, values in _shortcut(recipe, model, report, (train, evals), f_eval, act, bar).items():
                report[h]["shortcut"] = values
    for h, r in report.items():
        name, value, base = M.primary(h, r)
        r["primary"] = {"metric": name, "value": value, "baseline": base,
                        "beats_baseline": bool(value - base >= _margin(name))}
        if r.get("shortcut"):
            s = r["shortcut"]
            kept, why = M.shortcut_share(s["text only"], s["text+activity"], base, _margin(name))
            r["shortcut_share"] = {"value": kept, "undefined": why or None}
        stage.log_metrics(head=h, **{k: v for k, v in r.items() if isinstance(v, (int, float))})
    out = stage.path("eval.json")
    atomic_write_json(out, _jsonable(report))
    outputs = [out, plot_rm_metrics(report, stage.path("rm_metrics.png"))] if cfg.plot else [out]
    for line in summary_lines(report, text_only=not model.activity):
        print(line)
    stage.finish(outputs)
    return stage


def _ceilings(recipe: RMRecipe, evals: dict[str, HeadData]) -> dict[str, dict[str, Any]]:
    """The simulator's ground truth scored like a head, per head that has a true counterpart."""
    # Imported here, by the evaluation alone: no training code path ever loads the simulator's
    # truth (test_training_code_never_reads_ground_truth checks this file for it).
    from alignloop.rewards.ceiling import Ceiling, find_ground_truth

    truth = find_ground_truth(Path(recipe.data.build), recipe.data.ground_truth)
    if truth is None:
        return {}
    ceiling = Ceiling(truth)
    reports = {h: ceiling.report(d, recipe.eval.ece_bins) for h, d in evals.items()}
    return {h: c for h, c in reports.items() if c is not None}


SHORTCUT_VARIANTS: dict[str, dict[str, bool]] = {
    "text only": {"activity": False, "use_text": True},
    "text+activity": {"activity": True, "use_text": True},
    "activity only": {"activity": True, "use_text": False},
}


def _shortcut(recipe: RMRecipe, model: RewardModel, report: dict[str, Any],
              sets: tuple[dict[str, HeadData], dict[str, HeadData]], f_eval: dict[str, Features],
              act: tuple[dict[str, np.ndarray], dict[str, np.ndarray]], bar: Any) -> dict[str, dict[str, float]]:
    """Each head's primary metric for all three variants: the served heads are one of them (read from
    `report`), the other two are retrained here on the same cached features."""
    train, evals = sets
    f_train = {h: model.features(d, bar) for h, d in train.items()}
    served = "text+activity" if model.activity else "text only"
    out = {h: {served: M.primary(h, report[h])[1]} for h in evals}
    for label, kw in SHORTCUT_VARIANTS.items():
        if label == served:
            continue
        other = RewardModel(model.backbone, model.names, recipe.train, **kw)
        other.fit(train, act[0], cached=f_train, progress=bar, describe=f"shortcut: {label}")
        for h, (p, pr) in _predict_sets(other, evals, f_eval, act[1]).items():
            out[h][label] = M.primary(h, _head_report(h, evals[h], p, pr, train[h], recipe.eval.ece_bins))[1]
    return out


def _margin(metric: str) -> float:
    # "Clearly better than the baseline": a few points of AUC / pair accuracy / concordance, or R^2.
    return 0.03 if metric in ("auc", "pair_accuracy", "concordance") else 0.02


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _binary_detail(r: dict[str, Any]) -> str:
    return (f" | base rate {_f(r.get('positive_rate'))} accuracy {_f(r['accuracy'])} (majority "
            f"{_f(r['baseline_accuracy'])}) balanced accuracy {_f(r.get('balanced_accuracy'))} (0.500) "
            f"ece {_f(r['ece'])} (base rate {_f(r['baseline_ece'])})")


def _headline(label: str, r: dict[str, Any], industry: str) -> str:
    """One head's headline; the published accuracy is quoted only beside balanced labels, where
    accuracy and the published figures (on balanced sets) mean the same thing."""
    c = r.get("ceiling", {})
    rate = r.get("positive_rate")
    ceiling = f"; ceiling AUC {_f(c.get('auc'))} accuracy {_f(c.get('accuracy'))}" if c else ""
    line = (f"rm-eval headline: {label} AUC {_f(r['auc'])} balanced accuracy {_f(r.get('balanced_accuracy'))} "
            f"accuracy {_f(r['accuracy'])} (majority {_f(r['baseline_accuracy'])}, base rate {_f(rate)}{ceiling})")
    if M.balanced_labels(rate):
        return line + f"; industry accuracy {industry} on balanced labels"
    return line + f"; no industry comparison: labels {_f(rate)} positive, not balanced"


def shortcut_line(h: str, r: dict[str, Any], text_only: bool) -> str:
    s, p = r["shortcut"], r["primary"]
    kept, why = M.shortcut_share(s["text only"], s["text+activity"], p["baseline"], _margin(p["metric"]))
    share = _f(kept) if kept is not None else why
    return (f"rm-eval shortcut {h:<13} {p['metric']}: served ({'text only' if text_only else 'text+activity'}) "
            f"{_f(p['value'])} | text only {_f(s['text only'])} | text+activity {_f(s['text+activity'])} "
            f"| activity only {_f(s['activity only'])} | share surviving without activity {share}")


def summary_lines(report: dict[str, Any], text_only: bool = True) -> list[str]:
    lines = []
    for h, r in report.items():
        p = r["primary"]
        c = r.get("ceiling", {})
        extra = ""
        if "auc" in r:
            extra = _binary_detail(r)
        elif "r2" in r:
            extra = f" | r2 {_f(r['r2'])} pearson {_f(r['pearson'])}"
        ceil = ""
        if c:
            ceil = " | ceiling " + " ".join(f"{k} {_f(v)}" for k, v in c.items() if k != "truth") + f" ({c['truth']})"
        lines.append(f"rm-eval {h:<13} {p['metric']} {_f(p['value'])} vs baseline {_f(p['baseline'])} "
                     f"[{'beats' if p['beats_baseline'] else 'DOES NOT beat'}]{extra}{ceil}")
    if "continue" in report:
        lines.append(_headline("continue", report["continue"], "~0.75"))
    if "returned_7d" in report:
        lines.append(_headline("return-7d", report["returned_7d"], "~0.84"))
    if "turns_after" in report:
        r = report["turns_after"]
        lines.append(f"rm-eval headline: future-turns r2 {_f(r['r2'])} pearson {_f(r['pearson'])} "
                     f"(ceiling pearson {_f(r.get('ceiling', {}).get('pearson'))}; industry ~0.56)")
    for h, r in report.items():
        if r.get("shortcut"):
            lines.append(shortcut_line(h, r, text_only))
    return lines


# --- reward fit-weights ------------------------------------------------------------------------


def run_fit_weights(recipe: RMRecipe, run: str | None = None, force: bool = False) -> Stage:
    with torch_threads(recipe.backbone.threads):
        return _run_fit_weights(recipe, run, force)


def _run_fit_weights(recipe: RMRecipe, run: str | None, force: bool) -> Stage:
    run, rm_dir = _trained(recipe, run, COMBINE_FILE)
    kpi = recipe.combine.kpi
    build = Path(recipe.data.build)
    files = [rm_dir / "heads.safetensors", dataset_path(build, kpi, "train"), dataset_path(build, kpi, "eval")]
    config = {"combine": recipe_to_dict(recipe)["combine"], "data": recipe_to_dict(recipe)["data"]}
    stage = Stage(recipe.run.dir, run, "reward", config, inputs=files)
    if stage.skip_if_complete(force):
        return stage
    saved = json.loads((rm_dir / COMBINE_FILE).read_text())
    normalizer = Normalizer(**saved["normalizer"])
    backbone = make_backbone(recipe.backbone, rm_dir / "embeddings", seed=recipe.train.seed)
    model = RewardModel.load(rm_dir, backbone=backbone)
    components = [h for h in model.names if h != "safety"]
    limit_t, limit_e = recipe.data.max_train_rows, recipe.data.max_eval_rows
    train, evals = load_head(recipe.data, kpi, "train", limit_t), load_head(recipe.data, kpi, "eval", limit_e)
    check_disjoint(train, evals)
    # Heads trained with user-activity features get them here too (each split's own users' logs).
    act_t = activity_matrix(activity_features(recipe.data, "train"), train.user_id) if model.activity else None
    act_e = activity_matrix(activity_features(recipe.data, "eval"), evals.user_id) if model.activity else None
    with progress() as bar:
        z_t = normalizer(model.predict(model.features(train, bar).x, act_t, names=components))
        z_e = normalizer(model.predict(model.features(evals, bar).x, act_e, names=components))
    choice = choose_weights(z_t, train.label, z_e, evals.label, train.weight)
    candidates = {"learned": choice.learned, "equal": choice.equal,
                  "recipe": {k: w for k, w in recipe.combine.weights.items() if k in components}}
    scores = {name: score_weights(z_e, w, evals.label) for name, w in candidates.items()}
    for name, value in scores.items():
        stage.log_metrics(weights=name, kpi=kpi, auc=value)
    out = stage.path(WEIGHTS_FILE)
    # `weights` is what `combine.use = "learned"` serves: the fit, or equal weights when it lost.
    atomic_write_json(out, {"kpi": kpi, **candidates, "heldout_auc": _jsonable(scores), "served": choice.served,
                            "weights": choice.weights, "train_rows": len(train), "eval_rows": len(evals)})
    print(f"reward fit-weights: KPI {kpi} on held-out users ({len(evals)} rows): AUC learned {_f(scores['learned'])} "
          f"vs equal {_f(scores['equal'])} vs recipe {_f(scores['recipe'])}")
    print("reward fit-weights: learned weights " + ", ".join(f"{k} {v:+.3f}" for k, v in choice.learned.items()))
    warning = choice.warning(kpi)
    if warning:
        print(warning)
    stage.finish([out], extra={"weights_served": choice.served, "warning": warning})
    return stage
