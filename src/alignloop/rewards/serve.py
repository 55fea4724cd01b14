"""The `RewardFn` RL uses: a trained reward model's heads, combined, with safety as a constraint.

    reward_fn = load_reward_fn("runs/rm-demo/rm")          # weights from the recipe
    batch = reward_fn(contexts, responses)                 # RewardBatch: reward, components, unsafe

Components (each an [n] array, for per-batch logging): `raw/<head>` (the head's natural output),
`<head>` (its weighted, normalised contribution to the reward), `p_unsafe`, `lagrangian` (the
penalty lambda * p_unsafe subtracted), `flagged` (1 where the hard constraint set -K), `floor_lift`
(what the floor -K + margin added to an unflagged reply; 0 where it did not bind).

A reward model without a safety head is refused unless the combine section says `safety = "none"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alignloop.errors import AlignloopError
from alignloop.rewards.api import RewardBatch, validated
from alignloop.rewards.combine import Lagrangian, Normalizer, equal_weights, safety_floor, weighted_sum
from alignloop.rewards.config import CombineSection
from alignloop.rewards.model import RewardModel

COMBINE_FILE = "combine.json"  # in the rm folder: normaliser stats and the recipe's combine section
WEIGHTS_FILE = "weights.json"  # in runs/<run>/reward/: learned weights


class CombinedReward:
    name = "combined"

    def __init__(self, model: RewardModel, normalizer: Normalizer, weights: dict[str, float], config: CombineSection):
        if model.activity:
            raise AlignloopError("a reward for RL must score text alone; this model also reads user activity")
        self.model = model
        self.normalizer = normalizer
        self.weights = {k: w for k, w in weights.items() if k in model.names and k != "safety"}
        dropped = sorted(set(weights) - set(self.weights) - {"safety"})
        if dropped and any(weights[k] for k in dropped):
            raise AlignloopError(f"combine weights name component(s) {dropped} the reward model has no head for")
        if config.safety == "head" and "safety" not in model.names:
            raise AlignloopError('this reward model has no safety head, so the combined reward would have no '
                                 'safety constraint: train one or set combine.safety = "none"')
        self.config = config
        self.has_safety = config.safety == "head"
        self.lagrangian = Lagrangian(config.unsafe_budget, config.dual_lr, config.lambda_init, config.lambda_max)
        # An RL loop that moves the multiplier itself, once per step, sets this False.
        self.dual_updates_per_call = True

    def __call__(self, contexts: list[list[dict]], responses: list[str]) -> RewardBatch:
        raw = self.model.score(contexts, responses)
        z = self.normalizer({k: raw[k] for k in self.weights})
        reward, contributions = weighted_sum(z, self.weights)
        n = len(responses)
        components = {f"raw/{k}": v for k, v in raw.items()} | contributions
        unsafe = np.zeros(n, dtype=bool)
        if self.has_safety:
            p_unsafe = raw["safety"]
            if self.config.lagrangian:
                lam = self.lagrangian.value  # this batch pays the current price; then the price moves
                components["lagrangian"] = -lam * p_unsafe
                reward = reward - lam * p_unsafe
                if self.dual_updates_per_call:
                    self.lagrangian.update(float(p_unsafe.mean()) if n else 0.0)
            floored, unsafe = safety_floor(reward, 1.0 - p_unsafe, self.config.safety_tau, self.config.hard_penalty,
                                           self.config.floor_margin)
            components["p_unsafe"] = p_unsafe
            components["flagged"] = unsafe.astype(np.float64)
            components["floor_lift"] = np.where(unsafe, 0.0, floored - reward)
            reward = floored
        return RewardBatch(reward=reward, components=components, unsafe=unsafe)


def load_reward_fn(rm_dir: str | Path, config: CombineSection | None = None, weights: str | dict[str, float] | None = None):
    """A validated `RewardFn` from an `rm train` folder (runs/<run>/rm).

    `config`: the combine section (default: the one saved at training time). `weights`: a dict,
    "recipe", "equal", "learned" (runs/<run>/reward/weights.json next to it) or a path to a JSON file;
    default: config.use.
    """
    rm_dir = Path(rm_dir)
    combine_path = rm_dir / COMBINE_FILE
    if not combine_path.is_file():
        raise AlignloopError(f"no {COMBINE_FILE} in {rm_dir} (run `alignloop rm train` first)")
    saved = json.loads(combine_path.read_text())
    config = config or CombineSection.model_validate(saved["combine"])
    model = RewardModel.load(rm_dir)
    normalizer = Normalizer(**saved["normalizer"])
    choice = weights if weights is not None else config.use
    if isinstance(choice, dict):
        w = choice
    elif choice == "recipe":
        w = config.weights
    elif choice == "equal":
        w = equal_weights([k for k in model.names if k != "safety"])
    else:
        path = rm_dir.parent / "reward" / WEIGHTS_FILE if choice == "learned" else Path(choice)
        if not path.is_file():
            raise AlignloopError(f"learned weights not found: {path} (run `alignloop reward fit-weights` first)")
        saved = json.loads(path.read_text())
        # "weights": the fit when it beat equal weights on held-out users, else equal weights;
        # files written before that check carry only "learned".
        w = saved.get("weights", saved["learned"])
    return validated(CombinedReward(model, normalizer, w, config))
