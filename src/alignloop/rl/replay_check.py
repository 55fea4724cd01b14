"""Routing replay, measured: a GRPO run of an MoE policy trained with replay and one without, each
batch scored both ways, so the gap between the trainer's and the engine's log-probs is read on the
same tokens with the trainer routing as the engine did and as its own router would.

Two numbers per side, over the policy tokens the trainer trained on (`Trainer._engine_gap`):
  gap        mean |log p_trainer - log p_engine| per token
  clipped    share of tokens whose ratio p_trainer / p_engine leaves [1 - clip_low, 1 + clip_high]
             (what PPO-style clipping would cut if the engine's log-probs served as pi_old)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignloop.errors import AlignloopError
from alignloop.rl.config import RLRecipe
from alignloop.rl.stage import run_rl
from alignloop.ui import say


@dataclass
class ReplaySide:
    trained_with_replay: bool
    gap_replay: float
    gap_router: float
    clipped_replay: float
    clipped_router: float
    steps: int


def _side(metrics: Path, replay: bool) -> ReplaySide:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "engine_gap" in r]
    if not rows:
        raise AlignloopError(f"{metrics}: no step logged engine_gap (did every sequence have advantage 0?)")
    other = "noreplay" if replay else "replay"
    if f"{other}/engine_gap" not in rows[0]:
        raise AlignloopError(f"{metrics}: no {other}/engine_gap: the engine recorded no routing (is the policy MoE, "
                             "and the rollout engine ours?)")

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    # The run's own forward logs the plain keys; the check's other forward, the tagged ones.
    with_replay = "" if replay else "replay/"
    router_own = "noreplay/" if replay else ""
    return ReplaySide(replay, mean(f"{with_replay}engine_gap"), mean(f"{router_own}engine_gap"),
                      mean(f"{with_replay}engine_clip_frac"), mean(f"{router_own}engine_clip_frac"), len(rows))


def replay_check(recipe: RLRecipe, run: str, force: bool = False) -> dict[str, Any]:
    """Train `recipe` twice (replay on, off), each with `replay_check`; print the table, return the summary."""
    sides = []
    for replay in (True, False):
        r = recipe.model_copy(deep=True)
        r.rl.routing_replay, r.rl.replay_check = replay, True
        stage = run_rl(r, run=f"{run}-{'replay' if replay else 'noreplay'}", force=force)
        sides.append(_side(stage.path("metrics.jsonl"), replay))
    say("routing replay: trainer vs engine log-probs on the same policy tokens (mean over steps)")
    say(f"{'run trained':<22}{'scored':<16}{'|dlogp| per token':>19}{'clipped ratio':>15}")
    for s in sides:
        trained = "with replay" if s.trained_with_replay else "without replay"
        say(f"{trained:<22}{'with replay':<16}{s.gap_replay:>19.5f}{s.clipped_replay:>15.4f}")
        say(f"{'':<22}{'router own':<16}{s.gap_router:>19.5f}{s.clipped_router:>15.4f}")
    on = sides[0]
    return {"model": recipe.model.name, "steps": on.steps,
            "gap_with_replay": round(on.gap_replay, 6), "gap_without_replay": round(on.gap_router, 6),
            "clipped_with_replay": round(on.clipped_replay, 6), "clipped_without_replay": round(on.clipped_router, 6),
            "gap_ratio": round(on.gap_router / on.gap_replay, 3) if on.gap_replay > 0 else None,
            "trained_without_replay": {"gap_with_replay": round(sides[1].gap_replay, 6),
                                       "gap_without_replay": round(sides[1].gap_router, 6),
                                       "clipped_with_replay": round(sides[1].clipped_replay, 6),
                                       "clipped_without_replay": round(sides[1].clipped_router, 6)}}
