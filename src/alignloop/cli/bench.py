"""`alignloop bench NAME`: ours vs the peer on the same work, in one run; the last line is one JSON object."""

from __future__ import annotations

import json
import os
import sys
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


def _restart_under_tcmalloc(name: str) -> None:
    """Run this bench process under TCMalloc where the system has it (`engine/allocator.py`: our
    engine measured 938 vs 875 tok/s against tuned glibc malloc): the allocator vLLM's CPU docs ask
    for and its worker gets, and PyTorch's CPU tuning guide recommends for inference. Every side of
    a bench runs in this one process (or, vLLM, under the same allocator), so all get it: under
    glibc, a reward round spent ~8% of its time faulting in pages of freshly mapped activations, on
    both sides. Only a real `alignloop bench NAME` command line restarts (not a test calling the
    command in-process)."""
    from alignloop.engine.allocator import ld_preload, tcmalloc_loaded, tcmalloc_path

    path = tcmalloc_path()
    if path is None or tcmalloc_loaded() or sys.argv[1:3] != ["bench", name]:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ld_preload([path], env.get("LD_PRELOAD", ""))
    os.execve(sys.executable, [sys.executable, "-m", "alignloop.cli", *sys.argv[1:]], env)


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
    batch: Annotated[int, typer.Option(min=1, help="Sequences per forward, both sides.")] = 64,
    dtypes: Annotated[str, typer.Option(help="dtypes timed on both sides, comma-separated.")] = "bfloat16,float32",
    peer_attention: Annotated[str, typer.Option(help="The peer's attn_implementation(s), comma-separated.")]
    = "sdpa,eager",
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Reward scoring throughput: MiniLM + heads (ours) vs an HF AutoModelForSequenceClassification of the same
    size, both sorted by length, in each dtype; the headline is the peer's fastest dtype."""
    _restart_under_tcmalloc("reward")
    from alignloop.bench.reward import run_bench

    config = {"responses": responses, "batch": batch, "dtypes": dtypes, "peer_attention": peer_attention,
              "rounds": rounds, "threads": threads}
    _record_bench("reward", config, run, runs_dir, lambda: run_bench(
        n=responses, batch=batch, threads=threads, rounds=rounds, dtypes=tuple(dtypes.split(",")),
        peer_attention=tuple(peer_attention.split(","))))


@app.command("generate")
def bench_generate(
    model: ModelOpt = "smollm2-135m",
    prompts: Annotated[int, typer.Option(min=1, max=64, help="How many of the 64 fixed prompts.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1)] = 128,
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    dtype: Annotated[str, typer.Option(help="Our engine's dtype (auto: the engine's default for this CPU); "
                                            "the peers' headline dtype follows it.")] = "auto",
    peer_batches: Annotated[str, typer.Option(help="transformers batch sizes (generate_batch: max requests) "
                                                   "swept per path, comma-separated.")] = "16,64",
    peer_dtypes: Annotated[str, typer.Option(help="transformers dtypes swept per path, comma-separated.")]
    = "bfloat16,float32",
    paths: Annotated[str, typer.Option(help="transformers paths, comma-separated (generate, static, "
                                            "generate_batch).")] = "generate,static,generate_batch",
    sweep_tokens: Annotated[int, typer.Option(min=1, help="New tokens per prompt in the untimed sweep.")] = 32,
    timed_paths: Annotated[str, typer.Option(help="transformers in the timed rounds: `best` (its fastest path "
                                                  "in our dtype) or `each` (every path's fastest; slower).")]
    = "best",
    vllm: Annotated[bool, typer.Option(help="Measure vLLM on CPU (needs `make peers`).")] = True,
    llamacpp: Annotated[bool, typer.Option(help="Measure llama.cpp, batched (needs `make peers`).")] = True,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """RL rollout workload: sampled chat completions, ours vs vLLM on CPU, llama.cpp and transformers' generate paths."""
    _restart_under_tcmalloc("generate")
    from alignloop.bench.generate import run_bench

    split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    config = {"model": model, "prompts": prompts, "max_tokens": max_tokens, "rounds": rounds, "threads": threads,
              "dtype": dtype, "peer_batches": peer_batches, "peer_dtypes": peer_dtypes, "paths": paths,
              "sweep_tokens": sweep_tokens, "timed_paths": timed_paths, "vllm": vllm,
              "llamacpp": llamacpp}
    _record_bench("generate", config, run, runs_dir, lambda: run_bench(
        model=model, n_prompts=prompts, max_tokens=max_tokens, rounds=rounds, threads=threads, dtype=dtype,
        peer_batches=[int(b) for b in split(peer_batches)], peer_dtypes=split(peer_dtypes), paths=split(paths),
        sweep_tokens=sweep_tokens, timed_paths=timed_paths, vllm=vllm, llamacpp=llamacpp))


@app.command("engine-profile")
def bench_engine_profile(
    model: ModelOpt = "smollm2-135m",
    dtype: Annotated[str, typer.Option(help="The engine's dtype (auto: its default for this CPU).")] = "auto",
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Where a decode step of our engine spends its time (GEMMs, attention, cache writes, norms, sampling,
    Python), beside the GEMM roofline's step; no peer, the line says why `bench generate` is not faster."""
    _restart_under_tcmalloc("engine-profile")
    from alignloop.bench.engine_profile import run_profile

    _record_bench("engine-profile", {"model": model, "dtype": dtype, "threads": threads}, run, runs_dir,
                  lambda: run_profile(model=model, dtype=dtype, threads=threads))


@app.command("mla-decode")
def bench_mla_decode(
    model: Annotated[str, typer.Option(help="DeepSeek zoo preset.")] = "small-deepseek",
    batch: Annotated[int, typer.Option(min=1, help="Rows decoded together, both sides.")] = 16,
    prompt_len: Annotated[int, typer.Option(min=1, help="Longest prompt (random tokens; 75-100% of it).")] = 128,
    steps: Annotated[int, typer.Option(min=1, help="Timed decode steps per round.")] = 64,
    mtp_tokens: Annotated[int, typer.Option(min=1, help="Tokens per row in the MTP vs plain greedy runs.")] = 64,
    checkpoint: Annotated[str | None, typer.Option(help="A trained DeepSeek checkpoint folder (default: the "
                                                       "random-init preset).")] = None,
    dtype: Annotated[str, typer.Option(help="Both sides' dtype (auto: the engine's default for this CPU).")]
    = "auto",
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """DeepSeek decode: latent cache + absorbed MLA (ours) vs expanded K/V (peer), cache bytes per token,
    and MTP speculative decoding's acceptance and speed-up."""
    from alignloop.bench.mla_decode import run_bench

    config = {"model": model, "batch": batch, "prompt_len": prompt_len, "steps": steps, "mtp_tokens": mtp_tokens,
              "checkpoint": checkpoint, "dtype": dtype, "rounds": rounds, "threads": threads}
    _record_bench("mla-decode", config, run, runs_dir, lambda: run_bench(
        model=model, batch=batch, prompt_len=prompt_len, steps=steps, mtp_tokens=mtp_tokens, rounds=rounds,
        threads=threads, dtype=dtype, checkpoint=checkpoint))


@app.command("template")
def bench_template(
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    round_seconds: Annotated[float, typer.Option(min=0.01, help="About how long one round of the peer takes.")]
    = 1.0,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Chat-template rendering of the conformance corpus, ours vs transformers `apply_chat_template`."""
    from alignloop.bench.template import run_bench

    config = {"rounds": rounds, "threads": threads, "round_seconds": round_seconds}
    _record_bench("template", config, run, runs_dir,
                  lambda: run_bench(rounds=rounds, threads=threads, round_seconds=round_seconds))


@app.command("logs")
def bench_logs(
    events: Annotated[int, typer.Option(min=1000, help="Events in the simulated log.")] = 1_000_000,
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    memory_events: Annotated[int, typer.Option(
        min=0, help="Events for the streamed peak-memory check, run first (0: skip; at 10M, simulating alone "
                    "takes over five minutes on 2 cores).")] = 0,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """Log pipeline read + filter + build: events/s, ours (Polars) vs the same stages in DuckDB SQL."""
    import os

    from alignloop.bench.harness import bench_threads

    # Polars sizes its thread pool once, when it loads: set it before `alignloop.bench.logs` imports it.
    os.environ["POLARS_MAX_THREADS"] = str(bench_threads(threads))
    from alignloop.bench.logs import run_bench, run_memory_check

    if memory_events:
        print(json.dumps(run_memory_check(memory_events)))
    _record_bench("logs", {"events": events, "rounds": rounds, "threads": threads, "memory_events": memory_events},
                  run, runs_dir, lambda: run_bench(events, rounds=rounds, threads=threads))


@app.command("sft")
def bench_sft(
    model: ModelOpt = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=3, help="Alternating timed rounds per side (after a warm-up).")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per round, the same on both sides.")] = 2,
    dtype: Annotated[str, typer.Option(help="Base weights for both sides: bfloat16 (with bf16 autocast) "
                                            "or float32 (no autocast).")] = "bfloat16",
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """SFT with LoRA: trained tokens/s, ours vs TRL `SFTTrainer` (packed, padding-free) on the same conversations."""
    from alignloop.bench.sft import run_bench

    _record_bench("sft", {"model": model, "rounds": rounds, "steps": steps, "dtype": dtype, "threads": threads},
                  run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, steps=steps, dtype=dtype, threads=threads))


@app.command("dpo")
def bench_dpo(
    model: ModelOpt = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=3, help="Alternating timed rounds per side (after a warm-up).")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per round, the same on both sides.")] = 2,
    dtype: Annotated[str, typer.Option(help="Base weights for both sides: bfloat16 (with bf16 autocast) "
                                            "or float32 (no autocast).")] = "bfloat16",
    pairs: Annotated[int, typer.Option(min=8, help="Fixed preference pairs generated for both sides.")] = 64,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """DPO with LoRA: trained pair tokens/s, ours vs TRL `DPOTrainer` (reference precomputed) on the same pairs."""
    from alignloop.bench.dpo import run_bench

    _record_bench("dpo", {"model": model, "rounds": rounds, "steps": steps, "dtype": dtype, "pairs": pairs,
                          "threads": threads}, run, runs_dir,
                  lambda: run_bench(model=model, rounds=rounds, steps=steps, dtype=dtype, n_pairs=pairs,
                                    threads=threads))


@app.command("grpo")
def bench_grpo(
    model: ModelOpt = "smollm2-135m",
    rounds: Annotated[int, typer.Option(min=3, help="Alternating timed one-step rounds per side (after a warm-up).")]
    = 3,
    threads: ThreadsOpt = None,
    peer_generation: Annotated[str | None, typer.Option(
        help="TRL's generation path: vllm, generate, static or cb (default: vllm colocate where vLLM imports, "
             "else the path measured fastest on CPU).")] = None,
    dtype: Annotated[str, typer.Option(help="Both sides: float32 (weights, no autocast) or bfloat16 "
                                            "(bf16 weights, fp32 adapters, bf16 autocast).")] = "float32",
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """GRPO with LoRA, 8 prompts x 8 generations x 64 tokens: s/step, ours vs TRL `GRPOTrainer` at its best."""
    from alignloop.bench.grpo import run_bench

    config = {"model": model, "rounds": rounds, "threads": threads, "peer_generation": peer_generation,
              "dtype": dtype}
    _record_bench("grpo", config, run, runs_dir, lambda: run_bench(model=model, rounds=rounds, threads=threads,
                                                                   peer_generation=peer_generation, dtype=dtype))


@app.command("serve")
def bench_serve(
    model: ModelOpt = "smollm2-135m",
    clients: Annotated[int, typer.Option(min=1, help="Concurrent clients (and the engine's batch size).")] = 8,
    seconds: Annotated[float, typer.Option(min=1.0, help="How long each round's clients run.")] = 20.0,
    max_tokens: Annotated[int, typer.Option(min=1)] = 32,
    dtype: Annotated[str, typer.Option(help="auto, float32 or bfloat16, both sides.")] = "auto",
    rounds: RoundsOpt = 3,
    threads: ThreadsOpt = None,
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """The server under N concurrent streaming clients (with events) vs the same requests straight to the
    engine in-process and vs one at a time: tokens/s, time to first token, latency, lost events."""
    from alignloop.bench.serve import run_bench

    config = {"model": model, "clients": clients, "seconds": seconds, "max_tokens": max_tokens, "dtype": dtype,
              "rounds": rounds, "threads": threads}
    _record_bench("serve", config, run, runs_dir, lambda: run_bench(
        model=model, clients=clients, seconds=seconds, max_tokens=max_tokens, rounds=rounds, threads=threads,
        dtype=dtype))


@app.command("moe-train")
def bench_moe_train(
    preset: Annotated[str, typer.Option(help="DeepSeek preset (tiny-deepseek ~6M, small-deepseek ~30M).")]
    = "tiny-deepseek",
    batch: Annotated[int, typer.Option(min=1, help="Rows per step, both sides.")] = 8,
    seq: Annotated[int, typer.Option(min=2, help="Tokens per row, both sides.")] = 256,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps per round, the same on both sides.")] = 2,
    rounds: Annotated[int, typer.Option(min=3, help="Alternating timed rounds per side (after a warm-up).")] = 3,
    threads: Annotated[str, typer.Option(help="Thread counts, each measured in its own rounds, comma-separated; "
                                              "the headline is each side at its fastest.")] = "1,2",
    run: RunOpt = None,
    runs_dir: RunsDirOpt = Path("runs"),
) -> None:
    """MoE pre-training step: tokens/s of our DeepSeek-style model vs transformers' DeepseekV3ForCausalLM,
    same config, weights, batch, AdamW and fp32; the peer at its fastest attention/experts implementation."""
    from alignloop.bench.moe_train import run_bench

    counts = tuple(int(n) for n in threads.split(","))
    _record_bench("moe-train", {"preset": preset, "batch": batch, "seq": seq, "steps": steps, "rounds": rounds,
                                "threads": list(counts)}, run, runs_dir,
                  lambda: run_bench(preset=preset, batch=batch, seq=seq, steps=steps, rounds=rounds, threads=counts))
