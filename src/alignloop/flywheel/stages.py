"""The stages of one turn of the loop, each a thin call into the package that does the work.

Every stage is a function `(turn, force) -> summary` over a `Turn`: where the turn's folders are,
which model is deployed (the A/B control) and which model the turn has produced so far. The work
itself, and the skip-if-unchanged / resume-after-kill logic, lives in each stage's own module
(`alignloop.sim.stage`, `alignloop.data.stage`, `alignloop.train.stage`, `alignloop.eval.offline`,
...); the flywheel only wires outputs to inputs. Summaries are small JSON-able dicts that the
report (`alignloop.flywheel.report`) turns into HTML and markdown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from alignloop.data.builders import split_of
from alignloop.data.config import LogsRecipe
from alignloop.data.stage import run_build_stage, run_filter_stage, run_ingest_stage
from alignloop.errors import AlignloopError
from alignloop.eval.abtest_stage import run_abtest
from alignloop.eval.config import ABTestRecipe
from alignloop.eval.offline import run_logs_eval, run_offline_eval
from alignloop.eval.rl_hook import heldout_groundtruth, simulated_users_groundtruth
from alignloop.flywheel.config import FlywheelRecipe, RLStageSection
from alignloop.rewards.config import DataSection, RMRecipe
from alignloop.rewards.stage import run_rm_eval, run_rm_train, summary_lines
from alignloop.rl.config import EnvSection, RLRecipe
from alignloop.rl.hacking import GroundTruthFn
from alignloop.rl.reward_env import RewardModelEnvSection
from alignloop.rl.stage import run_rl
from alignloop.rl.user_env import UserSimEnvSection
from alignloop.runs import atomic_path, atomic_write_json
from alignloop.sections import ModelSection, RunSection
from alignloop.sim.config import (
    OutputSection,
    ResponderSection,
    SimConfig,
    SimulateRecipe,
)
from alignloop.sim.stage import run_simulate
from alignloop.train.config import DPODataSection, DPORecipe, SFTDataSection, SFTRecipe
from alignloop.train.pretrain import PretrainRecipe, run_pretrain
from alignloop.train.stage import run_dpo, run_sft


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
    turn n+1: fresh users talking to turn n's model through the engine (small, slow).
    With `flywheel.deploy = "server"`, every turn's model runs behind a real server and the logs
    are its log store's (`alignloop.serve.simclient`)."""
    world = _world(turn)
    recipe = SimulateRecipe(run=turn.run_section, simulate=world, output=OutputSection())
    if turn.recipe.flywheel.deploy == "server":
        return _simulate_through_server(turn, recipe, force)
    stage = run_simulate(recipe, force=force)
    m = _manifest(stage.dir)
    return {"counts": m.get("counts"), "speed": m.get("speed"), "responder": world.responder.version()}


def _simulate_through_server(turn: Turn, recipe: SimulateRecipe, force: bool) -> dict:
    from alignloop.serve.simclient import Deployment

    e = turn.recipe.next_world.engine
    version = f"turn-{turn.number - 1}" if turn.number > 1 else "base"
    store = turn.dir("deploy") / "logs.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    # A re-run after a kill posts the same rows again (the world is deterministic): no-ops in the store.
    with Deployment(turn.deployed, store, version, max_batch=e.max_batch, dtype=e.dtype,
                    max_tokens=e.max_tokens, temperature=e.temperature, top_p=e.top_p) as deployment:
        stage = run_simulate(recipe, force=force, relay=deployment)
        if deployment.responder.requests:
            atomic_write_json(store.parent / "server.json", {"url": deployment.url, "version": version,
                                                              "requests": deployment.responder.requests,
                                                              "prompt_tokens": deployment.responder.prompt_tokens,
                                                              "cached_tokens": deployment.responder.cached_tokens,
                                                              "completion_tokens": deployment.responder.tokens,
                                                              "rows_posted": deployment.posted})
    m = _manifest(stage.dir)
    server = json.loads((store.parent / "server.json").read_text())
    return {"counts": m.get("counts"), "speed": m.get("speed"), "responder": f"server:{version}",
            "server": {**server, "store": str(store)}}


def _world(turn: Turn) -> SimConfig:
    world = turn.recipe.world
    if turn.number == 1 and turn.recipe.flywheel.deploy == "simulate":
        return world
    nxt = turn.recipe.next_world
    responder = ResponderSection(kind="engine", engine=nxt.engine.model_copy(update={"model": turn.deployed}))
    if turn.number == 1:  # served: the recipe's world, answered by the base model
        return world.model_copy(update={"responder": responder})
    # A seed of the turn's own: its users are fresh people, not turn 1's world again.
    return world.model_copy(update={"seed": world.seed + 7919 * turn.number, "users": nxt.users, "days": nxt.days,
                                    "max_turns": nxt.max_turns, "responder": responder})


def ingest(turn: Turn, force: bool) -> dict:
    """Real logs (`[logs] source = "ingest"`): the recipe's inputs and/or the chitchat dataset, fresh tables."""
    logs = turn.recipe.logs
    stage = run_ingest_stage([Path(p) for p in logs.inputs], chitchat=logs.chitchat, run=turn.run_name,
                             runs_dir=Path(turn.recipe.run.dir), format=logs.format, force=force)
    m = _manifest(stage.dir)
    return {"counts": m.get("counts"), "rows": m.get("rows_after"), "quarantine_total": m.get("quarantine_total"),
            "sources": {"inputs": list(logs.inputs), "chitchat": logs.chitchat}}


def _logs_recipe(turn: Turn) -> LogsRecipe:
    filters = turn.recipe.filter
    if turn.recipe.logs.real and filters.source == "auto":
        # Only what this turn ingested: never a simulated world that happens to share the run folder.
        filters = filters.model_copy(update={"source": "ingest"})
    return LogsRecipe(run=turn.run_section, filter=filters, build=turn.recipe.build)


def filter_logs(turn: Turn, force: bool) -> dict:
    stage = run_filter_stage(_logs_recipe(turn), force=force)
    m = _manifest(stage.dir)
    return {"rows_in": m.get("rows_in"), "rows_out": m.get("rows_out"),
            "precision_recall": m.get("precision_recall"), "funnel_png": str(stage.path("funnel.png"))}


def build(turn: Turn, force: bool) -> dict:
    stage = run_build_stage(_logs_recipe(turn), force=force)
    m = _manifest(stage.dir)
    return {"datasets": m.get("datasets"), "notes": m.get("notes") or []}


# --- training ----------------------------------------------------------------------------------


STOPS = frozenset({"empty", "constant", "empty_train", "empty_eval"})
"""Kinds of build notes (`alignloop.data.dataset_writer.explain`) that leave a trainer nothing to learn
from, or (empty_eval) nothing to be evaluated on: the flywheel stops on them before training."""


def _untrainable(turn: Turn, wanted: dict[str, frozenset[str]]) -> list[dict[str, str]]:
    """The build's notes on the datasets in `wanted` (name -> the note kinds that matter for it):
    minutes of training on an empty set, or on a label that never changes, would end in a model
    that learnt nothing and no word why, so the stages stop on them first."""
    notes = _manifest(turn.dir("build")).get("notes") or []
    return [n for n in notes if n.get("kind") in wanted.get(n.get("dataset"), frozenset())]


def _stop(turn: Turn, stage: str, notes: list[dict[str, str]], hint: str = "") -> None:
    if notes:
        raise AlignloopError(f"turn {turn.number} {stage}: " + "; ".join(n["line"] for n in notes)
                             + (f" ({hint})" if hint else ""))


def sft(turn: Turn, force: bool) -> dict:
    """SFT of the deployed model on the answers users settled on (build.sft.source)."""
    recipe = turn.recipe
    data = turn.dir("build") / f"{recipe.sft.dataset}.parquet"
    _stop(turn, "sft", _untrainable(turn, {recipe.sft.dataset: STOPS}))
    _require_examples(turn, data)
    if recipe.logs.real:
        data = _train_users_only(turn, data)
    sft_recipe = SFTRecipe(run=turn.run_section,
                           model=ModelSection(name=turn.model, dtype=recipe.flywheel.dtype),
                           data=SFTDataSection(path=data), train=recipe.sft.train)
    stage = run_sft(sft_recipe, force=force)
    turn.model = str(stage.path("model"))
    m = _manifest(stage.dir)
    return {"model": turn.model, "train": m.get("train"), "data": m.get("data"),
            "metrics": str(stage.path("metrics.jsonl"))}


def preference(turn: Turn, force: bool) -> dict:
    """Preference optimisation of the newest model (SFT's) on this turn's build: the swipe pairs, or
    for kto the thumbs' train split. Its model is what the reward models' RL then starts from."""
    section = turn.recipe.preference
    dataset = "rm/thumbs" if section.loss == "kto" else "dpo"
    _stop(turn, "preference", _untrainable(turn, {dataset: STOPS}))
    data = turn.dir("build") / ("rm/thumbs/train.parquet" if section.loss == "kto" else "dpo.parquet")
    if not data.is_file():
        needs = 'build.rm with "thumbs" in build.rm.signals' if section.loss == "kto" else "build.dpo"
        raise AlignloopError(f"turn {turn.number} preference ({section.loss}): the build wrote no {data}; "
                             f"it needs {needs}")
    recipe = DPORecipe(run=turn.run_section, model=ModelSection(name=turn.model, dtype=turn.recipe.flywheel.dtype),
                       data=DPODataSection(path=data), train=section.train)
    stage = run_dpo(recipe, force=force)
    turn.model = str(stage.path("model"))
    m = _manifest(stage.dir)
    return {"model": turn.model, "loss": section.loss, "train": m.get("train"), "data": m.get("data"),
            "baseline": m.get("baseline"), "metrics": str(stage.path("metrics.jsonl"))}


TRAIN_USERS_SFT = "sft.train-users.parquet"


def _train_users_only(turn: Turn, data: Path) -> Path:
    """The SFT set without the held-out users (the reward models' eval split, whose prompts the offline
    eval asks): the build's SFT set holds every user's answers, and a model fine-tuned on a held-out
    user's own conversations would be scored on prompts it has seen answered. Simulated turns need no
    such cut: their eval users are fresh simulated people."""
    rm = turn.recipe.build.rm
    rows = pl.read_parquet(data)
    kept = rows.filter(split_of(rows["user_id"], rm.eval_fraction, rm.salt) == "train")
    out = turn.dir("build") / TRAIN_USERS_SFT
    if not kept.height:
        raise AlignloopError(f"turn {turn.number} sft: every one of {rows.height:,} SFT examples belongs to a held-out "
                             f"user (build.rm.eval_fraction = {rm.eval_fraction:g}); none is left to train on")
    with atomic_path(out) as tmp:
        kept.write_parquet(tmp)
    return out


def _require_examples(turn: Turn, data: Path) -> None:
    """One line, before training, when the turn's SFT set is empty, with why the build left it so:
    its skip counts and the quality filter's reasons (e.g. every answer of a model that never ends
    one is cut at max_tokens and flagged truncated)."""
    if not data.is_file() or pq.ParquetFile(data).metadata.num_rows > 0:
        return  # a missing file is the trainer's own error to give
    skipped = {k: v for k, v in _manifest(turn.dir("build")).get("skipped", {}).items() if k.startswith("sft:") and v}
    quality = next((f for f in _manifest(turn.dir("filter")).get("filters", []) if f.get("name") == "quality"), {})
    raise AlignloopError(f"turn {turn.number} sft: {data} has no examples to train on (build skipped {skipped}; "
                         f"quality filter flagged {quality.get('dropped', 0)} of {quality.get('input', 0)} answers: "
                         f"{quality.get('reasons', {})})")


def reward_models(turn: Turn, force: bool) -> dict:
    """Reward-model heads on the turn's `build/rm` sets, then their held-out-user evaluation."""
    section = turn.recipe.rm
    wanted: dict[str, frozenset[str]] = {}
    for head in section.heads:
        # The quality head's rows are the continue set's; its labels come from elsewhere.
        name, kinds = ("rm/continue", STOPS - {"constant"}) if head == "quality" else (f"rm/{head}", STOPS)
        wanted[name] = wanted.get(name, frozenset()) | kinds
    blocked = _untrainable(turn, wanted)
    _stop(turn, "rm", blocked, hint="leave those heads out of rm.heads to train the others"
          + ('; without "safety", also set rm.combine.safety = "none"'
             if any(n["dataset"] == "rm/safety" for n in blocked) else ""))
    # Real logs: no simulator ceiling, even if a simulated world's truth sits in the run folder.
    truth = "none" if turn.recipe.logs.real else "auto"
    recipe = RMRecipe(run=turn.run_section,
                      data=DataSection(build=str(turn.dir("build")), heads=section.heads,
                                       max_train_rows=section.max_train_rows, max_eval_rows=section.max_eval_rows,
                                       ground_truth=truth),
                      backbone=section.backbone, train=section.train, eval=section.eval, combine=section.combine)
    trained = run_rm_train(recipe, force=force)
    evaluated = run_rm_eval(recipe, force=force)
    report_path = evaluated.path("eval.json")
    lines = summary_lines(json.loads(report_path.read_text())) if report_path.is_file() else []
    return {"rm_dir": str(trained.dir), "eval": str(report_path), "lines": lines,
            "plot": str(evaluated.path("rm_metrics.png"))}


def rl(turn: Turn, force: bool) -> dict:
    """RL from the newest model against the learned reward; the reward-hacking watch reads ground truth
    (evaluation only: it is passed in from here, never seen by the reward or the loss)."""
    recipe, section = turn.recipe, turn.recipe.rl
    reward = str(turn.dir("rm")) if section.reward == "learned" else section.reward
    if recipe.logs.real:
        return _rl_on_logs(turn, reward, force)
    env, truth, prompts = _rl_env(section, reward)
    rl_recipe = RLRecipe(run=turn.run_section, model=ModelSection(name=turn.model, dtype=recipe.flywheel.dtype),
                         env=env, sampling=section.sampling, rl=section.rl)
    stage = run_rl(rl_recipe, force=force, groundtruth=truth, prompts=prompts)
    turn.model = str(stage.path("model"))
    verdict_path = stage.path("reward_hacking.json")
    verdict = json.loads(verdict_path.read_text()) if verdict_path.is_file() else {}
    return {"model": turn.model, "metrics": str(stage.path("metrics.jsonl")), "reward": section.reward,
            "env": section.env, "reward_hacking": verdict}


def _rl_env(section: RLStageSection, reward: str) -> tuple[EnvSection, GroundTruthFn, list[list[dict]] | None]:
    """(the env section, the ground-truth scorer for the watch, prompts replacing the env's own or None).

    Both kinds are paid by `reward` alone (the learned one unless the recipe names a factory); the
    users' hidden taste reaches only the watch. single_turn: fresh users' first messages, answered
    once. multi_turn: the same kind of fresh users write every next message, and the learned
    p(continue) decides whether they stay (up to rl.max_turns bot turns)."""
    if section.env == "multi_turn":
        env = UserSimEnvSection(reward=reward, groundtruth=True, users=section.users, users_seed=section.users_seed,
                                max_turns=section.max_turns)
        return env, simulated_users_groundtruth(section.users, section.users_seed), None
    env = RewardModelEnvSection(reward=reward, groundtruth=True, users=section.users, users_seed=section.users_seed)
    prompts, truth = heldout_groundtruth(section.users, section.users_seed)
    return env, truth, prompts


def _rl_on_logs(turn: Turn, reward: str, force: bool) -> dict:
    """RL on the built prompts of the reward models' train users (build/rl/train.jsonl); nothing to
    watch it with, since real logs hold no ground truth (said in the report, `not_run`)."""
    recipe, section = turn.recipe, turn.recipe.rl
    _stop(turn, "rl", _untrainable(turn, {"rl": frozenset({"empty", "empty_train"})}))
    prompts = turn.dir("build") / "rl" / "train.jsonl"
    env = RewardModelEnvSection(reward=reward, prompts=str(prompts), groundtruth=False)
    rl_recipe = RLRecipe(run=turn.run_section, model=ModelSection(name=turn.model, dtype=recipe.flywheel.dtype),
                         env=env, sampling=section.sampling, rl=section.rl)
    stage = run_rl(rl_recipe, force=force)
    turn.model = str(stage.path("model"))
    return {"model": turn.model, "metrics": str(stage.path("metrics.jsonl")), "reward": section.reward,
            "prompts": str(prompts), "reward_hacking": {}}


# --- evaluation --------------------------------------------------------------------------------


def evaluate(turn: Turn, force: bool) -> dict:
    """Deployed vs new model on held-out users' prompts: ground truth, rule metrics, judge (optional)."""
    recipe = turn.recipe
    if recipe.logs.real:
        return _evaluate_on_logs(turn, force)
    return run_offline_eval(recipe.eval, turn.run_section, turn.deployed, turn.model, force,
                            exclude=[turn.dir("simulate") / "logs"], dtype=recipe.flywheel.dtype,
                            default_judge=recipe.flywheel.base_model)


def _evaluate_on_logs(turn: Turn, force: bool) -> dict:
    """The base, SFT and RL models on held-out real users' prompts (build/rl/eval.jsonl): the learned
    reward, rule metrics and the judge; checked first that none of those users trained anything."""
    recipe = turn.recipe
    _stop(turn, "eval", _untrainable(turn, {"rl": frozenset({"empty", "empty_eval"})}))
    models = {"base": turn.deployed}
    for name in ("sft", "rl"):
        if name in turn.summaries:
            models[name] = turn.summaries[name]["model"]
    training = [p for p in (turn.dir("build") / TRAIN_USERS_SFT, turn.dir("build") / "rl" / "train.jsonl",
                            *(turn.dir("build") / "rm").glob("*/train.parquet")) if p.is_file()]
    reward = turn.dir("rm") if "rm" in turn.summaries else None
    return run_logs_eval(recipe.eval, turn.run_section, models, turn.dir("build") / "rl" / "eval.jsonl", force,
                         reward=reward, exclude=training, dtype=recipe.flywheel.dtype,
                         default_judge=recipe.flywheel.base_model)


def abtest(turn: Turn, force: bool) -> dict:
    section = turn.recipe.abtest
    recipe = ABTestRecipe(run=turn.run_section, world=section.world, engine=section.engine,
                          decision=section.decision)
    stage, result = run_abtest(recipe, turn.deployed, turn.model, force=force)
    return {**result, "plot": str(stage.path("abtest.png"))}


StageFn = Callable[[Turn, bool], dict]

TURN_STAGES: dict[str, StageFn] = {
    "simulate": simulate,
    "ingest": ingest,
    "filter": filter_logs,
    "build": build,
    "sft": sft,
    "preference": preference,
    "rm": reward_models,
    "rl": rl,
    "eval": evaluate,
    "abtest": abtest,
}


def pretrain_base(recipe: FlywheelRecipe, run: str, force: bool) -> str:
    """Pre-train `flywheel.base_model` (`[pretrain]`), once per run: the model turn 1 deploys."""
    section = recipe.pretrain
    stage = run_pretrain(PretrainRecipe(run=RunSection(name=run, dir=recipe.run.dir),
                                        model=ModelSection(name=recipe.flywheel.base_model),
                                        data=section.data, train=section.train, mtp=section.mtp), run=run,
                         force=force)
    return str(stage.path("model"))
