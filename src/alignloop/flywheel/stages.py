"""The stages of one turn of the loop, each a thin call into the package that does the work.

Every stage is a function `(turn, force) -> summary` over a `Turn`: where the turn's folders are,
which model is deployed (the A/B control) and which model the turn has produced so far. The work
itself, and the skip-if-unchanged / resume-after-kill logic, lives in each stage's own module
(`alignloop.sim.stage`, `alignloop.data.cli_pipeline`, `alignloop.train.sft`, ...); the flywheel
only wires outputs to inputs. Summaries are small JSON-able dicts that the report reads.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignloop.flywheel.recipe import FlywheelRecipe
from alignloop.flywheel.report import img, plot_training_curves
from alignloop.sections import RunSection
from alignloop.ui import say


@dataclass
class Turn:
    recipe: FlywheelRecipe
    run: str
    number: int                       # 1-based
    deployed: str                     # the model users talk to at the start of the turn (A/B control)
    model: str                        # the newest model this turn has produced (starts as `deployed`)
    summaries: dict[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        """The run-folder name the stage modules see: runs/<run>/turn-<n>/<stage>/."""
        return f"{self.run}/turn-{self.number}"

    @property
    def run_section(self) -> RunSection:
        return RunSection(name=self.run_name, dir=self.recipe.run.dir)

    def dir(self, stage: str) -> Path:
        return Path(self.recipe.run.dir) / self.run_name / stage


def _manifest(stage_dir: Path) -> dict:
    try:
        return json.loads((stage_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# --- logs --------------------------------------------------------------------------------------


def simulate(turn: Turn, force: bool) -> dict:
    """Turn 1: the recipe's world with the built-in responder as the deployed model (big, fast);
    turn n+1: fresh users talking to turn n's model through the engine (small, slow)."""
    from alignloop.sim.config import OutputSection, ResponderSection, SimulateRecipe
    from alignloop.sim.stage import run_simulate

    recipe = turn.recipe
    world = recipe.world
    if turn.number > 1:
        nxt = recipe.next_world
        responder = ResponderSection(kind="engine", engine=nxt.engine.model_copy(update={"model": turn.deployed}))
        world = world.model_copy(update={
            "seed": world.seed + 7919 * turn.number, "users": nxt.users, "days": nxt.days,
            "max_turns": nxt.max_turns, "responder": responder})
    stage = run_simulate(SimulateRecipe(run=turn.run_section, simulate=world, output=OutputSection()),
                         force=force)
    m = _manifest(stage.dir)
    return {"counts": m.get("counts"), "speed": m.get("speed"), "responder": world.responder.version()}


def _logs_recipe(turn: Turn):
    from alignloop.data.cli_pipeline import LogsRecipe

    return LogsRecipe(run=turn.run_section, filter=turn.recipe.filter, build=turn.recipe.build)


def filter_logs(turn: Turn, force: bool) -> dict:
    from alignloop.data.cli_pipeline import run_filter_stage

    stage = run_filter_stage(_logs_recipe(turn), force=force)
    m = _manifest(stage.dir)
    return {"rows_in": m.get("rows_in"), "rows_out": m.get("rows_out"),
            "precision_recall": m.get("precision_recall"), "funnel_png": str(stage.path("funnel.png"))}


def build(turn: Turn, force: bool) -> dict:
    from alignloop.data.cli_pipeline import run_build_stage

    stage = run_build_stage(_logs_recipe(turn), force=force)
    return {"datasets": _manifest(stage.dir).get("datasets")}


# --- training ----------------------------------------------------------------------------------


def sft(turn: Turn, force: bool) -> dict:
    """SFT of the deployed model on the answers users chose after swiping."""
    from alignloop.sections import ModelSection
    from alignloop.train.sft import SFTDataSection, SFTRecipe, run_sft

    recipe = turn.recipe
    data = turn.dir("build") / f"{recipe.sft.dataset}.parquet"
    sft_recipe = SFTRecipe(run=turn.run_section,
                           model=ModelSection(name=turn.model, dtype=recipe.flywheel.dtype),
                           data=SFTDataSection(path=data), train=recipe.sft.train)
    stage = run_sft(sft_recipe, force=force)
    turn.model = str(stage.path("model"))
    m = _manifest(stage.dir)
    return {"model": turn.model, "train": m.get("train"), "data": m.get("data"),
            "metrics": str(stage.path("metrics.jsonl"))}


def reward_models(turn: Turn, force: bool) -> dict:
    """Reward-model heads on the turn's `build/rm` sets, then their held-out-user evaluation."""
    from alignloop.rewards.config import DataSection, RMRecipe
    from alignloop.rewards.stages import run_rm_eval, run_rm_train, summary_lines

    section = turn.recipe.rm
    recipe = RMRecipe(run=turn.run_section,
                      data=DataSection(build=str(turn.dir("build")), heads=section.heads,
                                       max_train_rows=section.max_train_rows, max_eval_rows=section.max_eval_rows),
                      backbone=section.backbone, train=section.train, eval=section.eval, combine=section.combine)
    trained = run_rm_train(recipe, force=force)
    evaluated = run_rm_eval(recipe, force=force)
    report_path = evaluated.path("eval.json")
    lines = summary_lines(json.loads(report_path.read_text())) if report_path.is_file() else []
    plot = evaluated.path("rm_metrics.png")
    html_part = ("<h3>Reward models (held-out users)</h3>" + (img(plot) if plot.is_file() else "")
                 + "<pre>" + "\n".join(html.escape(line) for line in lines) + "</pre>")
    return {"rm_dir": str(trained.dir), "eval": str(report_path), "lines": lines,
            "html": html_part, "markdown": [f"- {line}" for line in lines if "headline" in line]}


def rl(turn: Turn, force: bool) -> dict:
    """RL from the newest model against the learned reward; the reward-hacking watch reads ground truth
    (evaluation only: it is passed in from here, never seen by the reward or the loss)."""
    from alignloop.eval.rl_hook import heldout_groundtruth
    from alignloop.rl.config import EnvSection, RLRecipe
    from alignloop.rl.run import build_env, run_rl
    from alignloop.sections import ModelSection

    recipe, section = turn.recipe, turn.recipe.rl
    rm_dir = turn.dir("rm")
    reward = str(rm_dir) if section.reward == "learned" else section.reward
    env = EnvSection(kind="reward_model", reward=reward, groundtruth=True, users=section.users,
                     users_seed=section.users_seed)
    rl_recipe = RLRecipe(run=turn.run_section, model=ModelSection(name=turn.model, dtype=recipe.flywheel.dtype),
                         env=env, sampling=section.sampling, rl=section.rl)
    prompts, truth = heldout_groundtruth(section.users, section.users_seed)
    stage = run_rl(rl_recipe, force=force, env=build_env(rl_recipe, prompts), groundtruth=truth)
    turn.model = str(stage.path("model"))
    verdict_path = stage.path("reward_hacking.json")
    verdict = json.loads(verdict_path.read_text()) if verdict_path.is_file() else {}
    metrics = stage.path("metrics.jsonl")
    title = "RL: learned reward vs ground truth" if section.reward == "learned" else \
        f"RL: {section.reward} vs ground truth"
    plot = plot_training_curves(metrics, stage.dir.parent / "rl_curves.png", title,
                                keys=("reward", "gt/engagement"))
    html_part = (f"<h3>{html.escape(title)}</h3>" + (img(plot) if plot else "")
                 + f"<pre>{html.escape(json.dumps(verdict, indent=1))}</pre>")
    return {"model": turn.model, "metrics": str(metrics), "reward_hacking": verdict, "html": html_part,
            "markdown": [f"- RL reward-hacking watch: {json.dumps(verdict)}"]}


# --- evaluation --------------------------------------------------------------------------------


def evaluate(turn: Turn, force: bool) -> dict:
    """Deployed vs new model on held-out users' prompts: ground truth, rule metrics, judge (optional)."""
    import numpy as np

    from alignloop.eval.groundtruth import score_texts
    from alignloop.eval.heldout import check_disjoint, heldout_prompts
    from alignloop.eval.respond import answer
    from alignloop.eval.rules import rule_metrics
    from alignloop.eval.stats import paired
    from alignloop.runs import Stage, atomic_write_json

    recipe = turn.recipe
    section = recipe.eval
    models = {"deployed": turn.deployed, "new": turn.model}
    weights = [f for m in models.values() if Path(m).is_dir() for f in sorted(Path(m).glob("*.safetensors"))]
    config = {"eval": section.model_dump(mode="json"), "models": models}
    stage = Stage(recipe.run.dir, turn.run_name, "eval", config, inputs=weights)
    if not force and stage.is_complete():
        say(f"[green]eval: up to date[/] ({stage.dir}), skipped")
        return json.loads(stage.path("eval.json").read_text())
    stage.start()
    prompts = heldout_prompts(section.users)
    check_disjoint(prompts.user_ids, [turn.dir("simulate") / "logs"])
    out: dict[str, Any] = {"prompts": len(prompts), "users": prompts.n_users, "models": models}
    texts_by_model, engagement = {}, {}
    for name, model in models.items():
        say(f"eval: {name} model ({model}) answers {len(prompts)} held-out prompts")
        texts = answer(model, prompts.messages, section.sampling, dtype=recipe.flywheel.dtype)
        texts_by_model[name] = texts
        gt = score_texts(texts, prompts.user_texts, prompts.taste)
        engagement[name] = gt.engagement
        out[name] = {"gt_engagement": float(np.mean(gt.engagement)), "gt_quality": float(np.mean(gt.quality)),
                     "features": gt.feature_means(), "rules": rule_metrics(texts).to_json()}
    # Same prompts, same sampling seeds: a paired comparison.
    out["new_vs_deployed"] = paired(engagement["deployed"], engagement["new"]).as_dict()
    if section.judge:
        from alignloop.engine.engine import Engine
        from alignloop.eval.judge import rubric_eval

        judge = Engine.from_name(section.judge_model or recipe.flywheel.base_model, seed=0, show_progress=False)
        k = min(section.judge_prompts, len(prompts))
        for name, texts in texts_by_model.items():
            out[name]["judge"] = rubric_eval(judge, prompts.messages[:k], texts[:k]).summary()
    samples = [{"messages": m, **{name: t[i] for name, t in texts_by_model.items()}}
               for i, m in enumerate(prompts.messages[:20])]
    atomic_write_json(stage.path("samples.json"), samples)
    atomic_write_json(stage.path("eval.json"), out)
    stage.finish([stage.path("eval.json"), stage.path("samples.json")])
    say(f"eval: ground-truth engagement deployed {out['deployed']['gt_engagement']:+.3f} -> "
        f"new {out['new']['gt_engagement']:+.3f} on {len(prompts)} held-out prompts")
    return out


def abtest(turn: Turn, force: bool) -> dict:
    from alignloop.eval.abtest_stage import ABTestRecipe, run_abtest_stage

    section = turn.recipe.abtest
    recipe = ABTestRecipe(run=turn.run_section, world=section.world, engine=section.engine,
                          decision=section.decision)
    stage, result = run_abtest_stage(recipe, turn.deployed, turn.model, force=force)
    return {**result, "plot": str(stage.path("abtest.png"))}


StageFn = Callable[[Turn, bool], dict]

TURN_STAGES: dict[str, StageFn] = {
    "simulate": simulate,
    "filter": filter_logs,
    "build": build,
    "sft": sft,
    "rm": reward_models,
    "rl": rl,
    "eval": evaluate,
    "abtest": abtest,
}
