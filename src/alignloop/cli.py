"""The `alignloop` command: one subcommand per stage of the loop.

Every user mistake surfaces as an `AlignloopError` and is printed here as one red line (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

# Polars' allocator (jemalloc) and pyarrow's (mimalloc) keep freed pages resident for a while, so
# a streamed log job's resident memory grows to a multiple of what it holds (10M events: 5.4 GiB
# instead of 2.6). Both read these settings when they load, so they are set before anything
# imports them; values the user set win. Only for `alignloop logs ...`: handing pages back costs
# the in-memory work (benchmarks, training) about a fifth more CPU.
if next((a for a in sys.argv[1:] if not a.startswith("-")), None) == "logs":
    os.environ.setdefault("_RJEM_MALLOC_CONF", "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0")
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignloop import __version__
from alignloop.chat.cli_template import template_app
from alignloop.data.cli_ingest import ingest_command
from alignloop.data.cli_logs import logs_app
from alignloop.data.cli_pipeline import build_command, filter_command
from alignloop.errors import AlignloopError
from alignloop.eval.cli_eval import eval_app
from alignloop.train.cli_train import train_app
from alignloop.rl.cli_rl import rl_app
from alignloop.rewards.cli import reward_app, rm_app
from alignloop.ui import console, set_quiet

app = typer.Typer(
    name="alignloop",
    help="Turn a chat product's user logs into a better dialogue model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: ours vs the peer on the same work; ends with one JSON line.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
logs_app.command("ingest")(ingest_command)
logs_app.command("filter")(filter_command)
logs_app.command("build")(build_command)
app.add_typer(logs_app, name="logs", help="User logs: simulate a world, ingest real logs, filter, build datasets.")
app.add_typer(train_app, name="train", help="Trainers: SFT on chosen swipes, DPO from swipe pairs, distillation.")
app.add_typer(rl_app, name="rl", help="RL: GRPO/PPO against verifiable tasks or learned rewards.")


def _rl_groundtruth(kind: str, users: int, seed: int):
    # Evaluation only (the reward-hacking watch): built here because rl/ must not import eval/.
    from alignloop.eval.rl_hook import heldout_groundtruth, simulated_users_groundtruth

    if kind == "user_sim":
        return None, simulated_users_groundtruth(users, seed)
    return heldout_groundtruth(users, seed)


import alignloop.rl.cli_rl as _cli_rl  # noqa: E402

_cli_rl.GROUNDTRUTH = _rl_groundtruth
app.add_typer(rm_app, name="rm", help="Reward models from user signals: train, evaluate on held-out users.")
app.add_typer(reward_app, name="reward", help="Combined reward: learn component weights from logs.")
app.add_typer(eval_app, name="eval", help="Evaluate models: ground truth on held-out simulated users.")
app.add_typer(template_app, name="template",
              help="Chat templates: render, diff two families, lint for silent failures, token costs.")

SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe value: section.key=value (repeatable).")]


def _version(value: bool) -> None:
    if value:
        print(f"alignloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    set_quiet(quiet)


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="What the user says.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo name or checkpoint folder.")] = "smollm2-135m",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """One-shot chat: render PROMPT with the model's chat template and print the answer."""
    from alignloop.engine.chat_stage import run_chat

    answer = run_chat(prompt, model=model, system=system, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, run=run, runs_dir=runs_dir)
    print(answer)


@app.command()
def generate(
    recipe: Annotated[Path, typer.Argument(help="A generate recipe (TOML), e.g. recipes/generate.toml.")],
    set_: SetOption = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (overrides run.name).")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if inputs and config are unchanged.")] = False,
) -> None:
    """Answer a JSONL file of prompts in batch (resumable; invalid lines are quarantined)."""
    from alignloop.engine.generate_stage import GenerateRecipe, run_generate
    from alignloop.recipes import load_recipe

    run_generate(load_recipe(recipe, GenerateRecipe, set_ or []), run=run, force=force)


@app.command()
def models() -> None:
    """List the models the zoo knows by name."""
    from rich.table import Table

    from alignloop.models import KNOWN_MODELS, cache_dir

    table = Table("name", "what", title=f"model zoo (cache: {cache_dir()})")
    for name, what in KNOWN_MODELS.items():
        table.add_row(name, what)
    console.print(table)
    console.print("Also: any local HF checkpoint folder, or an 'org/name' hub id already in the HF cache.")


def _record_bench(name: str, config: dict, run: str | None, runs_dir: Path, bench) -> None:
    """Run a benchmark inside runs/<run>/bench-<name>/ and end with its one JSON line on stdout."""
    from alignloop.runs import Stage, atomic_write_json, default_run_name

    stage = Stage(runs_dir, run or default_run_name(), f"bench-{name}", config).start()
    line = bench()
    atomic_write_json(stage.path("result.json"), line)
    stage.finish([stage.path("result.json")])
    print(json.dumps(line))


@bench_app.command("reward")
def bench_reward(
    responses: Annotated[int, typer.Option(min=8, help="Synthetic (context, response) pairs scored per round.")] = 256,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    threads: Annotated[int, typer.Option(min=1, help="torch threads for both sides.")] = 1,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """Reward scoring throughput: MiniLM + heads (ours) vs an HF AutoModelForSequenceClassification of the same size."""
    from alignloop.rewards.bench import run_bench

    config = {"responses": responses, "batch": batch, "threads": threads}
    _record_bench("reward", config, run, runs_dir, lambda: run_bench(n=responses, batch=batch, threads=threads))


@bench_app.command("generate")
def bench_generate(
    model: Annotated[str, typer.Option(help="Zoo name.")] = "smollm2-135m",
    prompts: Annotated[int, typer.Option(min=1, max=64, help="How many of the 64 fixed prompts.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    peer_batches: Annotated[str, typer.Option(help="HF generate batch sizes to try, comma-separated.")] = "16,64",
    peer_dtypes: Annotated[str, typer.Option(help="HF dtypes to try, comma-separated.")] = "bfloat16,float32",
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """RL rollout workload: sampled chat completions, ours vs transformers `generate`."""
    from alignloop.bench.generate import run_bench

    config = {"model": model, "prompts": prompts, "max_tokens": max_tokens,
              "peer_batches": peer_batches, "peer_dtypes": peer_dtypes}
    _record_bench("generate", config, run, runs_dir, lambda: run_bench(
        model=model, n_prompts=prompts, max_tokens=max_tokens,
        peer_batches=[int(b) for b in peer_batches.split(",")], peer_dtypes=peer_dtypes.split(",")))


@bench_app.command("template")
def bench_template(
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """Chat-template rendering of the conformance corpus, ours vs transformers `apply_chat_template`."""
    from alignloop.bench.template import run_bench

    _record_bench("template", {}, run, runs_dir, run_bench)


@bench_app.command("logs")
def bench_logs(
    events: Annotated[int, typer.Option(min=1000, help="Events in the simulated log.")] = 1_000_000,
    memory_events: Annotated[int, typer.Option(min=0, help="Events for the streaming memory check (0: skip).")]
    = 10_000_000,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """Log pipeline filter + build, ours (Polars) vs a plain pandas implementation; optional 10M-event
    peak-memory check (its JSON line comes first)."""
    from alignloop.bench.logs import run_bench, run_memory_check

    if memory_events:
        print(json.dumps(run_memory_check(memory_events)))
    _record_bench("logs", {"events": events}, run, runs_dir, lambda: run_bench(events))


@bench_app.command("sft")
def bench_sft(
    model: Annotated[str, typer.Option(help="Zoo name.")] = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating timed rounds per side.")] = 3,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads for both sides (default: the "
                                                   "cores the 1-minute load leaves free).")] = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """SFT with LoRA: trained tokens/s, ours vs TRL `SFTTrainer` on the same conversations."""
    from alignloop.bench.sft import run_bench

    _record_bench("sft", {"model": model, "rounds": rounds, "threads": threads}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, threads=threads))


@bench_app.command("dpo")
def bench_dpo(
    model: Annotated[str, typer.Option(help="Zoo name.")] = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating timed rounds per side.")] = 3,
    pairs: Annotated[int, typer.Option(min=8, help="Fixed preference pairs generated for both sides.")] = 64,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads for both sides (default: the "
                                                   "cores the 1-minute load leaves free).")] = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """DPO with LoRA: trained pair tokens/s, ours vs TRL `DPOTrainer` on the same pairs."""
    from alignloop.bench.dpo import run_bench

    _record_bench("dpo", {"model": model, "rounds": rounds, "pairs": pairs, "threads": threads}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, n_pairs=pairs, threads=threads))


@bench_app.command("grpo")
def bench_grpo(
    model: Annotated[str, typer.Option(help="Zoo name.")] = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=1, help="Alternating timed steps per side (after a warm-up).")] = 3,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (default: a timestamp).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders go.")] = Path("runs"),
) -> None:
    """GRPO with LoRA, 8 prompts x 8 generations x 64 tokens: s/step, ours vs TRL `GRPOTrainer`."""
    from alignloop.bench.grpo import run_bench

    _record_bench("grpo", {"model": model, "rounds": rounds}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds))


from alignloop.flywheel.cli_flywheel import flywheel_command, report_command  # noqa: E402

app.command("flywheel")(flywheel_command)
app.command("report")(report_command)


@app.command("abtest")
def abtest(
    control: Annotated[str, typer.Argument(help="Control arm: 'template[:k=v,...]', a zoo name or a model folder.")],
    treatment: Annotated[str, typer.Argument(help="Treatment arm, same forms.")],
    recipe: Annotated[Optional[Path], typer.Option(help="An abtest recipe (TOML); default: built-in settings.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: section.key=value.")] = None,
    run: Annotated[Optional[str], typer.Option(help="Run folder name (overrides run.name).")] = None,
    force: Annotated[bool, typer.Option(help="Re-run even if nothing changed.")] = False,
) -> None:
    """Simulated A/B test on fresh users: per-user metrics, CIs, p-values, safety gate, decision."""
    from alignloop.eval.abtest_stage import ABTestRecipe, run_abtest_stage
    from alignloop.recipes import load_recipe

    if recipe is None:
        loaded = ABTestRecipe()
        if set_:
            raise typer.BadParameter("--set needs --recipe")
    else:
        loaded = load_recipe(recipe, ABTestRecipe, set_ or [])
    run_abtest_stage(loaded, control, treatment, run=run, force=force)


def main() -> None:
    try:
        app()
    except AlignloopError as e:
        console.quiet = False
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
