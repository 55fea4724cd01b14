"""`alignloop logs simulate RECIPE`: a simulated world written as a run stage.

Output in `runs/<run>/simulate/`: `logs/` (the five log tables), `ground_truth/` (traits, true
engagement per candidate, return chances, and `world.json`), `metrics.jsonl` (one line per block
of users), `manifest.json`. Unchanged recipe: skipped. The world is streamed block by block, so
its size is bounded by disk, not memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from alignloop.data.io import FORMATS, TableWriter
from alignloop.data.schema import LOG_SCHEMAS
from alignloop.runs import Stage, atomic_write_json, default_run_name
from alignloop.sim.config import SimulateRecipe
from alignloop.sim.responder import Responder, make_responder
from alignloop.sim.truth import TRUTH_SCHEMAS
from alignloop.sim.world import describe_world, simulate_blocks
from alignloop.ui import progress, say


class LogRelay(Protocol):
    """A deployed product between the simulated users and the logs (`alignloop.serve.simclient`):
    its `responder` answers the users, `post` hands it each block's log rows, `export` writes the
    logs it stored (Parquet, one file per table) into a folder."""

    responder: Responder

    def post(self, logs: dict[str, pa.Table]) -> None: ...

    def export(self, folder: Path) -> list[Path]: ...

    def describe(self) -> dict: ...


def run_simulate(recipe: SimulateRecipe, run: str | None = None, force: bool = False,
                 responder: Responder | None = None, relay: LogRelay | None = None) -> Stage:
    """The simulate stage: the world of `recipe.simulate`, block by block, into `runs/<run>/simulate/`.

    `responder` stands in for the recipe's deployed model (tests pass a fake). With a `relay` (a
    served deployment), its responder answers, every block's logs go to it, and `logs/` is what it
    stored; the simulator's own tables stay beside them in `sim_logs/` to compare. Returns the
    finished stage, or the complete one untouched when the recipe has not changed (unless `force`).
    """
    cfg, fmt = recipe.simulate, recipe.output.format
    config = recipe.stage_config() | ({"relay": relay.describe()} if relay is not None else {})
    stage = Stage(recipe.run.dir, run or recipe.run.name or default_run_name(), "simulate", config)
    if stage.skip_if_complete(force):
        return stage
    logs_dir, truth_dir = stage.path("logs"), stage.path("ground_truth")
    sim_dir = stage.path("sim_logs") if relay is not None else logs_dir
    _drop_stale(logs_dir, LOG_SCHEMAS, fmt)
    _drop_stale(truth_dir, TRUTH_SCHEMAS, fmt)
    if relay is not None:
        responder = relay.responder
    responder = responder if responder is not None else make_responder(cfg.responder)

    blocks = -(-cfg.users // cfg.block_users)
    events = 0
    simulating = 0.0  # seconds spent simulating, writing excluded
    started = time.perf_counter()
    with (TableWriter(sim_dir, LOG_SCHEMAS, fmt) as logs_out,
          TableWriter(truth_dir, TRUTH_SCHEMAS, fmt) as truth_out,
          progress() as bar):
        task = bar.add_task("simulate", total=blocks, info="")
        clock = time.perf_counter()
        for number, (logs, truth) in enumerate(simulate_blocks(cfg, responder)):
            block_seconds = time.perf_counter() - clock
            simulating += block_seconds
            events += logs["events"].num_rows
            logs_out.write(logs)
            if relay is not None:
                relay.post(logs)
            truth_out.write(truth)
            stage.log_metrics(step=number, users=truth["users"].num_rows, events=logs["events"].num_rows,
                              turns=logs["turns"].num_rows, seconds=round(block_seconds, 3),
                              events_per_s=round(logs["events"].num_rows / max(block_seconds, 1e-9)))
            bar.update(task, advance=1, info=f"{events:,} events")
            clock = time.perf_counter()
    world = truth_dir / "world.json"
    atomic_write_json(world, describe_world(cfg))
    total = time.perf_counter() - started
    counts = {"logs": logs_out.rows, "ground_truth": truth_out.rows}
    speed = {"simulate_seconds": round(simulating, 3), "total_seconds": round(total, 3),
             "events_per_s": round(events / max(simulating, 1e-9)),
             "events_per_s_with_writing": round(events / max(total, 1e-9))}
    stage.log_metrics(**{f"total_{k}": v for k, v in logs_out.rows.items()}, **speed)
    outputs = [*logs_out.close(), *truth_out.close(), world]
    if relay is not None:
        outputs += relay.export(logs_dir)
    stage.finish(outputs, extra={"counts": counts, "speed": speed})
    say(f"[green]simulate: {events:,} events[/] from {cfg.users:,} users over {cfg.days} days "
        f"({speed['events_per_s']:,} events/s simulating) -> {stage.dir}")
    return stage


def _drop_stale(folder: Path, schemas, keep: str) -> None:
    """Files of the other format from an earlier run, which a reader might otherwise pick up."""
    for name in schemas:
        for fmt in FORMATS:
            if fmt != keep:
                (folder / f"{name}.{fmt}").unlink(missing_ok=True)
