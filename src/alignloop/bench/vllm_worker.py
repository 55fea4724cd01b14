"""vLLM as a bench peer: run by the peers environment's python (`make peers`), never imported by alignloop.

It loads `vllm.LLM` once and answers one JSON object per line on stdin with one JSON object per
line on stdout. vLLM logs to stdout, so the protocol keeps the original stdout to itself and
everything else written to fd 1 goes to stderr.

    argv[1]  {"model": folder, "dtype": "bfloat16", "max_num_seqs": 64}
    out      {"ready": true, "facts": {...}}                 once the model is loaded and warm
    in       {"cmd": "run", "prompts": [[{"role": ..., "content": ...}, ...], ...], "max_tokens": 128,
              "seeds": [...], "temperature": 1.0, "top_p": 0.95, "ignore_eos": false}
    out      {"useful": n, "computed": n, "seconds": s, "eos_rate": r}
    in       {"cmd": "quit"}                                  (or end of stdin) ends the worker
    out      {"error": "..."}                                 for a command it cannot do

`seconds` is measured here, around `LLM.generate` alone: the chat template and tokenization run
before the clock starts. `useful` counts each sequence's generated tokens up to and including
its first EOS; `computed` counts every token vLLM generated. vLLM stops a sequence at EOS, so
the two are equal unless `ignore_eos` is set.

The engine runs in a child process that vLLM spawns: hence the `__main__` guard.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _eos_ids(llm) -> set[int]:
    ids: set[int] = set()
    tokenizer = llm.get_tokenizer()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation = llm.llm_engine.model_config.try_get_generation_config() or {}
    eos = generation.get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def _count(token_ids: list[int], eos: set[int]) -> tuple[int, bool]:
    """(tokens up to and including the first EOS, whether there was one)."""
    for i, t in enumerate(token_ids):
        if t in eos:
            return i + 1, True
    return len(token_ids), False


def run(llm, eos: set[int], cmd: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
        for messages in cmd["prompts"]]
    params = [SamplingParams(temperature=cmd["temperature"], top_p=cmd["top_p"], max_tokens=cmd["max_tokens"],
                             seed=seed, ignore_eos=cmd.get("ignore_eos", False))
              for seed in cmd["seeds"]]
    began = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - began
    useful = computed = stopped = 0
    for out in outputs:
        ids = list(out.outputs[0].token_ids)
        n, hit = _count(ids, eos)
        useful, computed, stopped = useful + n, computed + len(ids), stopped + hit
    return {"useful": useful, "computed": computed, "seconds": seconds, "eos_rate": stopped / max(len(outputs), 1)}


def facts(llm, config: dict) -> dict:
    import torch
    import vllm
    from vllm.platforms import current_platform

    vllm_config = llm.llm_engine.vllm_config
    cache = vllm_config.cache_config
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_", "KMP_")) or k == "LD_PRELOAD"}
    return {"vllm": vllm.__version__, "torch": torch.__version__, "platform": type(current_platform).__name__,
            "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "max_num_seqs": config["max_num_seqs"],
            "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            "block_size": cache.block_size, "kv_cache_gib": round((cache.kv_cache_memory_bytes or 0) / 2**30, 2),
            "prefix_caching": bool(cache.enable_prefix_caching),
            "compilation": vllm_config.compilation_config.mode.name, "env": env}


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    config = json.loads(sys.argv[1])
    from vllm import LLM

    llm = LLM(model=config["model"], dtype=config["dtype"], max_num_seqs=config["max_num_seqs"], seed=0)
    eos = _eos_ids(llm)
    send({"ready": True, "facts": facts(llm, config)})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            if cmd.get("cmd") != "run":
                raise ValueError(f"unknown command {cmd.get('cmd')!r}")
            send(run(llm, eos, cmd))
        except Exception as exc:  # the caller gets the reason; the worker stays up for the next command
            send({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
