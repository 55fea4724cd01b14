"""`alignloop bench NAME`: ours vs the peer on the same work, in one run; the last line is one JSON object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from alignloop.cli.options import RunOpt, RunsDirOpt
from alignloop.runs import Stage, atomic_write_json, default_run_name

app = typer.Typer(help="Benchmarks: ours vs the peer on the same work; ends with one JSON line.",
                  no_args_is_help=True)

ModelOpt = Annotated[str, typer.Option(help="Zoo name.")]
RoundsOpt = Annotated[int, typer.Option(min=1, help="Alternating timed rounds per side.")]
ThreadsOpt = Annotated[int | None, typer.Option(
    min=1, help="Threads for both sides, fixed for the whole bench (default: every core this process may use).")]


def _record_bench(name: str, config: dict, run: str | None, runs_dir: Path, bench) -> None:
    """Run a benchmark inside runs/<run>/bench-<name>/ and end with its one JSON line on stdout."""
    stage = Stage(runs_dir, run or default_run_name(), f"bench-{name}", config).start()
    line = bench()
    atomic_write_json(stage.path("result.json"), line)
    stage.finish([stage.path("result.json")])
    print(json.dumps(line))


@app.command("reward")
def bench_reward(
    responses: Annotated[int, typer.Option(min=8, help="Synthetic (context, response) pairs scored per round.")] = 256,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    threads: Annotated[int, typer.Option(min=1, help="torch threads for both sides.")] = 1,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Reward scoring throughput: MiniLM + heads (ours) vs an HF AutoModelForSequenceClassification of the same size."""
    from alignloop.rewards.bench import run_bench

    config = {"responses": responses, "batch": batch, "threads": threads}
    _record_bench("reward", config, run, runs_dir, lambda: run_bench(n=responses, batch=batch, threads=threads))


@app.command("generate")
def bench_generate(
    model: ModelOpt = "smollm2-135m",
    prompts: Annotated[int, typer.Option(min=1, max=64, help="How many of the 64 fixed prompts.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    peer_batches: Annotated[str, typer.Option(help="HF generate batch sizes to try, comma-separated.")] = "16,64",
    peer_dtypes: Annotated[str, typer.Option(help="HF dtypes to try, comma-separated.")] = "bfloat16,float32",
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """RL rollout workload: sampled chat completions, ours vs transformers `generate`."""
    from alignloop.bench.generate import run_bench

    config = {"model": model, "prompts": prompts, "max_tokens": max_tokens,
              "peer_batches": peer_batches, "peer_dtypes": peer_dtypes}
    _record_bench("generate", config, run, runs_dir, lambda: run_bench(
        model=model, n_prompts=prompts, max_tokens=max_tokens,
        peer_batches=[int(b) for b in peer_batches.split(",")], peer_dtypes=peer_dtypes.split(",")))


@app.command("template")
def bench_template(
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Chat-template rendering of the conformance corpus, ours vs transformers `apply_chat_template`."""
    from alignloop.bench.template import run_bench

    _record_bench("template", {}, run, runs_dir, run_bench)


@app.command("logs")
def bench_logs(
    events: Annotated[int, typer.Option(min=1000, help="Events in the simulated log.")] = 1_000_000,
    memory_events: Annotated[int, typer.Option(min=0, help="Events for the streaming memory check (0: skip).")]
    = 10_000_000,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Log pipeline filter + build, ours (Polars) vs a plain pandas implementation; optional 10M-event
    peak-memory check (its JSON line comes first)."""
    from alignloop.bench.logs import run_bench, run_memory_check

    if memory_events:
        print(json.dumps(run_memory_check(memory_events)))
    _record_bench("logs", {"events": events}, run, runs_dir, lambda: run_bench(events))


@app.command("sft")
def bench_sft(
    model: ModelOpt = "smollm2-135m",
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """SFT with LoRA: trained tokens/s, ours vs TRL `SFTTrainer` on the same conversations."""
    from alignloop.bench.sft import run_bench

    _record_bench("sft", {"model": model, "rounds": rounds, "threads": threads}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, threads=threads))


@app.command("dpo")
def bench_dpo(
    model: ModelOpt = "smollm2-135m",
    rounds: RoundsOpt = 3,
    pairs: Annotated[int, typer.Option(min=8, help="Fixed preference pairs generated for both sides.")] = 64,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """DPO with LoRA: trained pair tokens/s, ours vs TRL `DPOTrainer` on the same pairs."""
    from alignloop.bench.dpo import run_bench

    _record_bench("dpo", {"model": model, "rounds": rounds, "pairs": pairs, "threads": threads}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, n_pairs=pairs, threads=threads))


@app.command("grpo")
def bench_grpo(
    model: ModelOpt = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating timed steps per side (after a warm-up).")] = 3,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """GRPO with LoRA, 8 prompts x 8 generations x 64 tokens: s/step, ours vs TRL `GRPOTrainer`."""
    from alignloop.bench.grpo import run_bench

    _record_bench("grpo", {"model": model, "rounds": rounds}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds))
